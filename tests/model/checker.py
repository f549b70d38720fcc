"""The checker of tests/model: replays a recorded history of admin operations and validations
and reports every verdict that no ordering consistent with the recorded times allows.

Pure Python, no database: tests/model/test_checker.py feeds it fabricated histories.

The history (what tests/model/mixed_load.py records; times are integer microseconds of the
host's CLOCK_REALTIME, the clock the server judges verdicts by):

  {"t": "op", "key": K, "seq": n, "start": s, "end": e, "state": {...}}
      an admin operation on subject K (a token id, or "jwt:<jti>") that committed somewhere
      in (s, e): s before the transaction was sent, e after COMMIT returned. `state` is the
      subject's row as the operation's own transaction read it back just before COMMIT
      (seq 0: the subject's creation). A subject is changed by one admin thread only, so its
      operations are totally ordered by seq and each started after the previous one ended.
  {"t": "v", "key": K, "fn": "check"|"validate", "scope": S|None, "start": s, "end": e,
   "result": {...}}
      one validation call; the subject's creation ended before s.

The model. For a validation [s, e] of K, any operation of K that ended before s is applied;
one that started after e is not; one in between may or may not be (and, the operations of K
being sequential, the candidate states are the contiguous run of prefixes between those two).
The server judges at one instant t in [s, e] (its clock: CLOCK_REALTIME of the same host, as
is ours; checked per call through clock_timestamp() returned by the same statement). A
verdict is allowed when some candidate state at some t in [s, e] gives exactly that verdict:
the reason in README's order, and for an acceptance the identity (token_id, account,
key_type, scopes, expires_at, revoke_after).
"""

SCOPES_ORDER = ("read", "write", "admin")


def expected(state, t, scope):
    """The verdict (reason or 'valid') for `state` judged at time t (microseconds)."""
    if state.get("kind") == "jwt":
        if state.get("revoked"):
            return "revoked"
        if t >= state["exp"] + state["leeway"]:
            return "expired"
    else:
        if state.get("family_revoked_at") is not None:
            return "family_revoked"
        if state.get("revoked_at") is not None:
            return "revoked"
        if state.get("revoke_after") is not None and state["revoke_after"] <= t:
            return "revoked"
        if state.get("expires_at") is not None and state["expires_at"] <= t:
            return "expired"
        if state.get("disabled_at") is not None:
            return "disabled"
    if scope is not None and scope not in (state.get("scopes") or []):
        return "insufficient_scope"
    return "valid"


def identity_matches(state, result):
    """An acceptance must carry the state's identity."""
    want = {
        "account": state["account"],
        "key_type": state["key_type"],
        "scopes": sorted(state.get("scopes") or []),
        "expires_at": state.get("expires_at"),
        "revoke_after": state.get("revoke_after"),
    }
    if state.get("kind") != "jwt":
        want["token_id"] = state["token_id"]
    else:
        want["expires_at"] = state["exp"]
    got = {k: (sorted(result.get(k) or []) if k == "scopes" else result.get(k)) for k in want}
    return got == want, want, got


def instants(states, s, e):
    """The instants in [s, e] at which some candidate's verdict may change, plus the ends."""
    ts = {s, e}
    for st in states:
        for k in ("revoke_after", "expires_at"):
            v = st.get(k)
            if st.get("kind") == "jwt" and k == "expires_at":
                v = st["exp"] + st["leeway"]
            if v is not None and s < v <= e:
                ts.add(v)
                ts.add(v - 1)
    return sorted(ts)


def check(history):
    """Returns (summary, anomalies). Each anomaly is a dict saying what was seen and why no
    ordering allows it."""
    ops = {}
    validations = []
    for rec in history:
        if rec["t"] == "op":
            ops.setdefault(rec["key"], []).append(rec)
        elif rec["t"] == "v":
            validations.append(rec)
    anomalies = []
    for key, lst in ops.items():
        lst.sort(key=lambda r: r["seq"])
        for a, b in zip(lst, lst[1:]):
            if b["start"] < a["end"]:
                anomalies.append({"kind": "history", "key": key, "why": f"operations {a['seq']} and {b['seq']} overlap: not one writer"})
    summary = {"validations": len(validations), "admin_ops": sum(len(v) for v in ops.values()),
               "subjects": len(ops), "accepted": 0, "refused": {}, "ambiguous": 0, "by_call": {}}
    for v in validations:
        lst = ops.get(v["key"])
        s, e, res = v["start"], v["end"], v["result"]
        if "error" in res:
            anomalies.append({"kind": "unexpected_error", "key": v["key"], "fn": v["fn"], "start": s, "end": e, "error": res["error"]})
            continue
        if not lst or lst[0]["end"] >= s:
            anomalies.append({"kind": "history", "key": v["key"], "why": "validated before its creation ended"})
            continue
        call = f"{v['fn']}_token/{'jwt' if v['key'].startswith('jwt:') else 'opaque'}"
        summary["by_call"][call] = summary["by_call"].get(call, 0) + 1
        lo = max(i for i, op in enumerate(lst) if op["end"] < s)
        hi = max(i for i, op in enumerate(lst) if op["start"] < e)
        states = [lst[i]["state"] for i in range(lo, hi + 1)]
        srv = res.get("server_ts")
        if srv is not None and not (s <= srv <= e):
            anomalies.append({"kind": "clock", "key": v["key"], "start": s, "end": e, "server_ts": srv,
                              "why": "the server's clock_timestamp() lies outside the call's client-side window"})
        seen = "valid" if res["valid"] else res["reason"]
        allowed = set()
        match = False
        mismatches = []
        for i, st in zip(range(lo, hi + 1), states):
            for t in instants(states, s, e):
                want = expected(st, t, v["scope"])
                allowed.add(want)
                if want != seen:
                    continue
                if seen != "valid":
                    match = True
                    continue
                ok, w, g = identity_matches(st, res)
                if ok:
                    match = True
                else:
                    mismatches.append({"state_seq": lst[i]["seq"], "want": w, "got": g})
        if len(allowed) > 1:
            summary["ambiguous"] += 1
        if seen == "valid":
            summary["accepted"] += 1
        else:
            summary["refused"][seen] = summary["refused"].get(seen, 0) + 1
        if not match:
            anomalies.append({
                "kind": "wrong_identity" if mismatches else "verdict",
                "key": v["key"], "hint": lst[0]["state"].get("hint"), "fn": v["fn"], "scope": v["scope"],
                "start": s, "end": e, "seen": seen, "allowed": sorted(allowed),
                "candidate_ops": [{"seq": lst[i]["seq"], "op": lst[i].get("op"), "start": lst[i]["start"], "end": lst[i]["end"]}
                                  for i in range(lo, hi + 1)],
                "last_op_before": {"seq": lst[lo]["seq"], "op": lst[lo].get("op"), "ended_us_before_call": s - lst[lo]["end"]},
                "identity_mismatches": mismatches[:3],
            })
    return summary, anomalies
