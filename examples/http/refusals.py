"""How a pg_token refusal becomes an HTTP answer: one table from reason to status, one function
that builds the response.

The database decides; this module only words the decision. It never sees more of the token
than the caller gives it, and the answers it builds hold the reason word and the database's
message (which carries no token: pg_token shows at most the prefix and 4 characters, in the
DETAIL this module does not use).
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    status: int
    error: str  # the body's `error`; for 401/403 also RFC 6750's error code in WWW-Authenticate


# Every reason token.reasons() lists today, and the one announced with its HTTP form. A new
# reason is one line here; tests/http checks that every reason the database knows has one.
RULES = {
    "malformed": Rule(401, "invalid_token"),
    "bad_checksum": Rule(401, "invalid_token"),
    "unknown_prefix": Rule(401, "invalid_token"),
    "environment_mismatch": Rule(401, "invalid_token"),
    "not_found": Rule(401, "invalid_token"),
    "revoked": Rule(401, "invalid_token"),
    "expired": Rule(401, "invalid_token"),
    "caller_invalid": Rule(401, "invalid_token"),
    "caller_not_permitted": Rule(403, "insufficient_scope"),
    "cross_account": Rule(403, "insufficient_scope"),
    "insufficient_scope": Rule(403, "insufficient_scope"),
    # Not the caller's fault: the pooled connection holds temporary objects or a WITH HOLD
    # cursor made under another identity. The service drops that connection; retry later.
    "tainted_session": Rule(503, "unavailable"),
    # Announced, not produced by pg_token yet: answered with Retry-After and RateLimit.
    "rate_limited": Rule(429, "rate_limited"),
    # Announced too; their lines will read like these once the reasons exist:
    #   "disabled": Rule(401, "invalid_token"),
    #   "legacy_token_retired": Rule(401, "invalid_token"),
    #   "family_revoked": Rule(401, "invalid_token"),
    #   "network_not_allowed": Rule(403, "insufficient_scope"),
    #   "usage_exhausted": Rule(429, "rate_limited"),
}

# A reason this table does not know (a newer pg_token): refuse, never answer 500.
FALLBACK = Rule(401, "invalid_token")

REALM = "api"

# token.validate_token / token.authenticate raise SQLSTATE 28000 with one of these messages.
_REJECTED = re.compile(r"^token rejected: ([a-z_]+)$")
_ENVIRONMENT = "Token environment mismatch:"


def reason_of(message):
    """The reason word in a 28000 message from pg_token, or None if the message has another shape."""
    if message is None:
        return None
    m = _REJECTED.match(message)
    if m:
        return m.group(1)
    if message.startswith(_ENVIRONMENT):
        return "environment_mismatch"
    return None


def refusal(reason, message=None, scope=None, retry_after=None):
    """(status, headers, body) for a refused token. `message` is the database's own text."""
    rule = RULES.get(reason, FALLBACK)
    body = {"error": rule.error, "reason": reason or "rejected"}
    if message:
        body["message"] = message
    headers = {}
    if rule.status == 503:
        headers["Retry-After"] = "1"
    elif rule.status == 429:
        # Retry-After (RFC 9110) for every client, and the IETF RateLimit field for those that
        # read it: the "pg_token" policy has 0 left and resets in `retry_after` seconds.
        seconds = max(1, int(retry_after or 1))
        headers["Retry-After"] = str(seconds)
        headers["RateLimit"] = f'"pg_token";r=0;t={seconds}'
    else:
        challenge = f'Bearer realm="{REALM}", error="{rule.error}"'
        if rule.error == "insufficient_scope" and scope:
            challenge += f', scope="{scope}"'
        headers["WWW-Authenticate"] = challenge
    return rule.status, headers, body


def missing(error=None):
    """(status, headers, body) when the request carries no usable Authorization header.

    RFC 6750 section 3.1: no error code when the request has no credentials at all;
    invalid_request when the header is there but is not `Bearer <token>`.
    """
    challenge = f'Bearer realm="{REALM}"'
    if error:
        challenge += f', error="{error}"'
    return 401, {"WWW-Authenticate": challenge}, {"error": error or "missing_token"}


_WELL_FORMED = re.compile(r"^([A-Za-z0-9_-]*[_-])([A-Za-z0-9]{28})$")


def hint(token):
    """The prefix and the first 4 body characters (what pg_token itself shows), or None when
    the string is not token-shaped: then nothing of it is safe to show."""
    m = _WELL_FORMED.match(token or "")
    if not m or len(m.group(1)) > 32:
        return None
    return m.group(1) + m.group(2)[:4]
