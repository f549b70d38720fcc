"""How a pg_token refusal becomes an HTTP answer: one table from reason to status, one function
that builds the response.

The database decides; this module only words the decision. It never sees more of the token
than the caller gives it, and the answers it builds hold the reason word and the database's
message (which carries no token: pg_token shows at most the prefix and 4 characters, in the
DETAIL this module does not use).
"""

import datetime
import email.utils
import math
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
    "family_revoked": Rule(401, "invalid_token"),
    "expired": Rule(401, "invalid_token"),
    "caller_invalid": Rule(401, "invalid_token"),
    "caller_not_permitted": Rule(403, "insufficient_scope"),
    "cross_account": Rule(403, "insufficient_scope"),
    "insufficient_scope": Rule(403, "insufficient_scope"),
    "disabled": Rule(401, "invalid_token"),
    "parent_invalid": Rule(401, "invalid_token"),
    # Legacy JWTs (migrating from JWTs). A retired one also carries the migration message.
    "unknown_issuer": Rule(401, "invalid_token"),
    "bad_signature": Rule(401, "invalid_token"),
    "legacy_token_retired": Rule(401, "invalid_token"),
    # The token is fine but not from here: 403 without a Bearer challenge (no other token
    # would do better from this address).
    "network_not_allowed": Rule(403, "forbidden"),
    # Not the caller's fault: the pooled connection holds temporary objects or a WITH HOLD
    # cursor made under another identity. The service drops that connection; retry later.
    "tainted_session": Rule(503, "unavailable"),
    # Answered with Retry-After and RateLimit: when the window resets.
    "rate_limited": Rule(429, "rate_limited"),
    # A spent cap: 429 with Retry-After when it refills, 403 when it never will.
    "usage_exceeded": Rule(429, "usage_exceeded"),
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


_RETRY = re.compile(r"(?:retry after|refill in) ([0-9]+(?:\.[0-9]+)?) s")


def retry_after_of(detail):
    """Seconds until a rate_limited or usage_exceeded token may succeed, from pg_token's DETAIL
    ("... retry after 0.412 s", "... until its refill in 3600 s"), or None."""
    m = _RETRY.search(detail or "")
    return float(m.group(1)) if m else None


def refusal(reason, message=None, scope=None, retry_after=None, detail=None):
    """(status, headers, body) for a refused token. `message` is the database's own text;
    `detail` its DETAIL, used only for a retired legacy JWT (it carries the migration message)."""
    rule = RULES.get(reason, FALLBACK)
    if reason == "usage_exceeded" and retry_after is None:
        rule = Rule(403, "usage_exceeded")  # no refill: retrying never helps
    body = {"error": rule.error, "reason": reason or "rejected"}
    if message:
        body["message"] = message
    headers = {}
    if reason == "legacy_token_retired" and detail:
        body["migration"] = one_line(detail)
        link = migration_link(detail)
        if link:
            headers["Link"] = link
    if rule.status == 503:
        headers["Retry-After"] = "1"
    elif rule.status == 429:
        # Retry-After (RFC 9110) for every client, and the IETF RateLimit field for those that
        # read it: the "pg_token" policy has 0 left and resets in `retry_after` seconds.
        seconds = max(1, math.ceil(retry_after or 1))
        headers["Retry-After"] = str(seconds)
        headers["RateLimit"] = f'"pg_token";r=0;t={seconds}'
    elif rule.error in ("forbidden", "usage_exceeded"):
        pass
    else:
        challenge = f'Bearer realm="{REALM}", error="{rule.error}"'
        if rule.error == "insufficient_scope" and scope:
            challenge += f', scope="{scope}"'
        headers["WWW-Authenticate"] = challenge
    return rule.status, headers, body


def rate_headers(limit, remaining, reset_in):
    """The IETF RateLimit fields of an accepted request whose token has a rate limit: the
    binding limit, what is left of it, and the seconds until its window resets."""
    if limit is None:
        return {}
    seconds = max(0, math.ceil(reset_in))
    return {"RateLimit-Policy": f'"pg_token";q={limit}', "RateLimit": f'"pg_token";r={remaining};t={seconds}'}


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_URL = re.compile(r"https?://[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+")
MAX_HEADER = 1000


def one_line(text, limit=MAX_HEADER):
    """Text made header-safe: control characters (newlines included) become one space, what is
    not printable ASCII becomes '?', runs of spaces one, at most `limit` characters."""
    text = _CONTROL.sub(" ", text)
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def migration_link(text):
    """`<URL>; rel="deprecation"` for the first http(s) URL in `text`, or None."""
    m = _URL.search(text or "")
    if not m:
        return None
    url = m.group(0).rstrip(".,;:!?)]'")
    return f'<{url}>; rel="deprecation"' if len(url) > len("https://") else None


def deprecation_headers(deprecation, sunset_at):
    """A legacy JWT's answer fields (migrating from JWTs): X-Auth-Deprecation with the identity's
    deprecation sentence on one line, Sunset (RFC 8594) with the issuer's cut-off as an
    HTTP-date, and Link rel="deprecation" to the migration guide when the message names a URL.
    Nothing for pg_token's own tokens (both NULL)."""
    if deprecation is None:
        return {}
    headers = {"X-Auth-Deprecation": one_line(deprecation)}
    if sunset_at is not None:
        headers["Sunset"] = email.utils.format_datetime(sunset_at.astimezone(datetime.timezone.utc), usegmt=True)
    link = migration_link(deprecation)
    if link:
        headers["Link"] = link
    return headers


_JWT = re.compile(r"^eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")


def is_jwt(token):
    """Whether the string has a JWT's shape (what pg_token reads as a legacy JWT)."""
    return bool(_JWT.match(token or ""))


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
