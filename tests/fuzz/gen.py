"""Random arguments for the fuzzer (tests/fuzz/fuzz.py): one generator per argument, chosen by
the argument's name and type, all drawn from one seeded random.Random, so a seed replays the
same cases.

Every value is the text form of an argument; the runner casts it to the argument's type
server-side, so a value that is not of the type (a garbage interval, an overflowing bigint)
reaches Postgres' own input parser, and one that is reaches pg_token.

Real tokens and validly signed JWTs never appear here: a value can only name one by index
(a marker, resolved server-side by fuzz.resolve from the round's tokens, passed as a bind
parameter that the log hook masks), so no credential is ever written into the cases table.
Markers start with \\x01 and a letter:
    T<i>               the i-th token             F<i>,<pos>,<c>  it with character pos replaced by c
    C<i>,<n>           its first n characters     S<i>,<s>        it followed by s
    R<i>,<s>           s followed by it           U<i>            it upper-cased
    I<i>               the i-th token id (uuid)   B<hex>          convert_from(bytes, 'UTF8')
"""

import json
import string
import zlib

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
M = "\x01"
HUGE = 1_000_000  # the smallest huge string: 1 MB

META = ["'", "''", "\"", "\\", "\\\\", "'; DROP TABLE token.tokens; --", "%s", "%", "$1", "$$",
        "E'\\x00'", "\\x00", "{", "}", "{,}", "(", ")", ",", "NULL", "null", "\t", "\n", "\r\n",
        " ", "", "--", "/*", "*/", ";", "\\N", "\u00a0", "\u200b", "\ufeff", "\U0001f600", "ë",
        "\u202e", "[", "]", "::text", "||", "token.", "pg_catalog.", "eyJ", ".", "..", "-", "_"]


def compose(prefix, body):
    """A well-formed token, checksum included, as src/core/format.rs writes it (CRC32 of
    prefix + body, 6 base62 digits, most significant first)."""
    n = zlib.crc32((prefix + body).encode())
    digits = ""
    for _ in range(6):
        n, r = divmod(n, 62)
        digits = ALPHABET[r] + digits
    return prefix + body + digits


def b64url(data):
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Gen:
    def __init__(self, rng, world):
        """world: what the database holds (prefixes, key types, accounts, issuers, counts of
        the round's tokens and ids), so that values are often near-valid, not just noise."""
        self.r = rng
        self.w = world

    # -- building blocks -------------------------------------------------------------------
    def pick(self, xs):
        return xs[self.r.randrange(len(xs))]

    def chance(self, p):
        return self.r.random() < p

    def base62(self, n):
        return "".join(self.r.choice(ALPHABET) for _ in range(n))

    def noise(self, n=None):
        """Random text: code points across the planes (never NUL or a surrogate), bytes as
        Latin-1, SQL metacharacters, token characters."""
        r = self.r
        n = r.choice([0, 1, 2, 5, 16, 40, 100, 300]) if n is None else n
        kind = r.randrange(5)
        if kind == 0:
            cps = [r.randrange(1, 0x110000) for _ in range(n)]
            return "".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF)
        if kind == 1:
            return bytes(r.randrange(1, 256) for _ in range(n)).decode("latin-1")
        if kind == 2:
            return "".join(self.pick(META) for _ in range(max(1, n // 4)))
        if kind == 3:
            return "".join(r.choice(string.printable) for _ in range(n)).replace("\x00", "")
        return self.base62(n)

    def raw_bytes(self):
        """Bytes converted server-side: mostly invalid UTF-8 (Postgres refuses it, 22021),
        sometimes valid."""
        b = bytes(self.r.randrange(1, 256) for _ in range(self.r.choice([1, 3, 8, 40])))
        return M + "B" + b.hex()

    def huge(self):
        n = self.r.randrange(HUGE, 10 * HUGE)
        unit = self.pick(["a", "fz-", "'", "é", self.base62(7)])
        return (unit * (n // len(unit) + 1))[:n]

    def text(self):
        if self.chance(0.08):
            return self.raw_bytes()
        return self.noise()

    def array(self, elem, maxlen=8):
        """A text[] literal: empty, NULL elements, quoting, now and then huge or malformed."""
        r = self.r
        k = r.randrange(12)
        if k == 0:
            return "{}"
        if k == 1:
            return self.pick(["{", "{{a},{b}}", "{a,{b}}", "[0:1]={a,b}", "{NULL}", "{\"\"}",
                              "{ , }", "a", "{\"a}", "{{a,b},{c,d}}", "{" * 10 + "}" * 10])
        if k == 2 and self.chance(0.05):
            n = r.choice([1001, 5000, 20000])
        else:
            n = r.randrange(0, maxlen)
        out = []
        for _ in range(n):
            if self.chance(0.08):
                out.append("NULL")
            else:
                e = elem()
                out.append('"' + e.replace("\\", "\\\\").replace('"', '\\"') + '"')
        return "{" + ",".join(out) + "}"

    # -- tokens ------------------------------------------------------------------------------
    def token(self):
        r, w = self.r, self.w
        k = r.randrange(22)
        nt = w["ntokens"]
        i = r.randrange(nt) + 1
        if k <= 4:
            return f"{M}T{i}"
        if k == 5:
            return f"{M}F{i},{r.randrange(1, 60)},{self.pick(list(ALPHABET) + ['_', '-', '.', ' ', 'é'])}"
        if k == 6:
            return f"{M}C{i},{r.randrange(-3, 60)}"
        if k == 7:
            return f"{M}{self.pick('SR')}{i},{self.pick(META + [self.base62(r.randrange(1, 40))])}"
        if k == 8:
            return f"{M}U{i}"
        if k in (20, 21):  # well formed, valid checksum, never issued: not_found
            return compose(self.pick(w["prefixes"]), self.base62(22))
        if k == 9:  # valid checksum over a wrong-length body or an unregistered prefix
            p = self.pick(w["prefixes"]) if self.chance(0.5) else self.base62(r.randrange(1, 8)) + self.pick("_-")
            return compose(p, self.base62(self.pick([0, 1, 21, 23, 40, 22])))
        if k == 10:  # right shape, wrong checksum
            return self.pick(w["prefixes"]) + self.base62(28)
        if k == 11:
            return self.jwt_garbage()
        if k == 12:
            return self.pick(["", " ", "-", "_", "fz-", "fz_", "a" * 256, "a" * 257, "é" * 129,
                              self.pick(w["prefixes"]) * 20])
        if k == 13 and self.chance(0.3):
            return f"{M}B" + bytes(r.randrange(1, 256) for _ in range(30)).hex()
        return self.noise()

    def leak_candidates(self):
        """report_leaked's list: it revokes every live token it is given, so the round's real
        tokens appear rarely (else none would be left to validate)."""
        def one():
            t = self.token()
            if t.startswith(M + "T") and not self.chance(0.1):
                return t.replace(M + "T", M + "U", 1)
            return t
        return self.array(one)

    def jwt(self):
        """For the arguments that take a JWT: half the time one the legacy issuer signed."""
        lo, hi = self.w["jwts"]
        if self.chance(0.5):
            return f"{M}{self.pick('TTTFC')}{self.r.randrange(lo, hi + 1)}" + (
                "" if self.chance(0.6) else f",{self.r.randrange(1, 200)}")
        return self.token()

    # Destructive calls (revoking an account's tokens, unregistering a prefix, dropping the
    # issuer) name the round's fixtures rarely, so the rest of the round still meets live ones.
    def account_rare(self):
        return self.pick(self.w["accounts"]) if self.chance(0.03) else self.text()

    def prefix_rare(self):
        if self.chance(0.03):
            return self.pick(self.w["prefixes"])
        return "fzx" + self.base62(self.r.randrange(1, 6)) + self.pick("_-") if self.chance(0.5) else self.text()

    def issuer_name_rare(self):
        return self.pick(self.w["issuer_names"]) if self.chance(0.03) else (
            "fzi_" + self.base62(3).lower() if self.chance(0.5) else self.text())

    def jwt_garbage(self):
        """JWT-shaped strings that no issuer signed: bad base64, bad JSON, alg none, random
        claims, wrong signatures (the validly signed ones come by marker)."""
        r = self.r
        hdr = self.pick([{"alg": "HS256", "typ": "JWT"}, {"alg": "none"}, {"alg": "RS256"},
                         {"alg": "ES256", "kid": self.noise(5)}, {}, {"alg": self.noise(3)},
                         [1, 2], "x", {"alg": "HS256", "crit": ["x"]}])
        claims = self.json_value(depth=3)
        if self.chance(0.6):
            claims = {"iss": self.pick(self.w["issuers"] + [self.noise(5)]), "sub": self.account(),
                      "exp": self.pick([2**31, 2**63, -1, 0, 1.5, "soon", None, 10**30]),
                      "jti": self.noise(8), "scope": self.pick(["read", ["read"], 5, None])}
        parts = [b64url(json.dumps(hdr).encode()), b64url(json.dumps(claims).encode()),
                 b64url(bytes(r.randrange(256) for _ in range(r.choice([0, 1, 32, 64, 256]))))]
        k = r.randrange(6)
        if k == 0:
            parts[r.randrange(3)] = self.noise(10)
        elif k == 1:
            parts = parts[:r.randrange(1, 3)]
        elif k == 2:
            parts.append(b64url(b"extra"))
        elif k == 3:
            parts[1] = "A" * self.pick([9000, 100])
        return ".".join(parts)

    # -- names and values ---------------------------------------------------------------------
    def account(self):
        k = self.r.randrange(10)
        if k <= 3:
            return self.pick(self.w["accounts"])
        if k == 4:
            return self.pick(["00042", "42", "-0", "0", "9223372036854775808",
                              "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
                              "a0eebc999c0b4ef8bb6d6bb9bd380a11", "x" * 256, "x" * 257, "é" * 256])
        return self.text()

    def key_type(self):
        k = self.r.randrange(6)
        if k <= 2:
            return self.pick(self.w["key_types"])
        if k == 3:
            return "fzk_" + self.base62(self.r.randrange(1, 6)).lower()
        return self.text()

    def key_type_array(self):
        return self.array(self.key_type)

    def prefix(self):
        k = self.r.randrange(8)
        if k == 0:
            return self.pick(self.w["prefixes"])
        if k <= 3:
            return "fzx" + self.base62(self.r.randrange(1, 6)) + self.pick("_-")
        if k == 4:
            return self.pick(self.w["prefixes"])[:-1] + self.base62(2) + "-"
        if k == 5:
            return self.pick(["-", "_", "a", "a-b", "-a-", "--", "a" * 32 + "-", "a" * 31 + "-", "f-", "fz"])
        return self.text()

    def environment(self):
        return self.pick(["dev", "prod", "staging"]) if self.chance(0.6) else self.text()

    def scope(self):
        return self.pick(["read", "write", "admin", "READ", ""]) if self.chance(0.6) else self.text()

    def scopes(self):
        return self.array(self.scope)

    def unset(self):
        fields = ["name", "expires_at", "uses", "refill", "rate_limits", "allowed_networks", "scopes"]
        return self.array(lambda: self.pick(fields) if self.chance(0.7) else self.text())

    def algorithms(self):
        return self.array(lambda: self.pick(["HS256", "RS256", "ES256", "none", "hs256", "HS512"])
                          if self.chance(0.8) else self.text(), maxlen=4)

    def key(self):
        k = self.r.randrange(8)
        if k == 0:
            return self.base62(self.pick([31, 32, 64, 200]))
        if k == 1:
            return "-----BEGIN PUBLIC KEY-----\n" + self.noise(64) + "\n-----END PUBLIC KEY-----\n"
        if k == 2:
            return json.dumps(self.pick([{"kty": "RSA", "n": self.base62(10), "e": "AQAB"},
                                         {"keys": [{"kty": "EC", "crv": "P-256", "x": "", "y": ""}]},
                                         {"keys": []}, {"kty": "oct", "k": self.base62(40)}]))
        if k == 3:
            return self.pick(self.w["pem_keys"])
        if k == 4 and self.chance(0.1):
            return "x" * 70000
        return self.text()

    def issuer_name(self):
        k = self.r.randrange(6)
        if k == 0:
            return self.pick(self.w["issuer_names"])
        if k <= 2:
            return "fzi_" + self.base62(3).lower()
        return self.text()

    def issuer_url(self):
        return self.pick(self.w["issuers"]) if self.chance(0.3) else self.text()

    def uuid(self):
        k = self.r.randrange(10)
        if k <= 5:
            return f"{M}I{self.r.randrange(self.w['nids']) + 1}"
        if k == 6:
            return "%032x" % self.r.getrandbits(128)
        if k == 7:
            return self.pick(["00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff",
                              "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", "A0EEBC999C0B4EF8BB6D6BB9BD380A11"])
        return self.text()

    def interval(self):
        r = self.r
        k = r.randrange(10)
        if k <= 3:
            n = self.pick([0, 1, 2, 30, 59, 3600, 86400, 10**6, 10**9, 2**31, 2**53])
            return f"{self.pick(['', '-'])}{n} {self.pick(['microseconds', 'seconds', 'minutes', 'hours', 'days', 'months', 'years'])}"
        if k == 4:
            return self.pick(["infinity", "-infinity", "0", "-1 s", "1 s ago", "P1Y2M3DT4H5M6S", "PT0S",
                              "178000000 years", "-178000000 years", "1e300 seconds", "2147483647 days",
                              "2147483648 days", "@ 1 hour ago", "1 day -1 second", "00:00:00.000001",
                              "9223372036854775807 microseconds", "1 fortnight", "1 day 2 days"])
        if k == 5:
            return self.text()
        return f"{r.randrange(-100, 1000)} {self.pick(['seconds', 'minutes', 'hours', 'days'])}"

    def timeout(self):
        """flush_events waits up to its timeout: kept short (still negative, zero, NULL,
        garbage), so a case costs at most a second."""
        return self.pick(["0", "-1 s", "1 ms", "10 ms", "-infinity", "P0D", "x", "1 year ago",
                          "100 ms" if self.chance(0.1) else "0"])

    def timestamptz(self):
        r = self.r
        k = r.randrange(8)
        if k <= 2:
            return self.pick(["infinity", "-infinity", "epoch", "now", "today", "tomorrow", "yesterday",
                              "294276-12-31 23:59:59+00", "294277-01-01", "4713-01-01 BC", "4714-11-24 BC",
                              "2024-02-30", "2024-13-01", "1999-01-08 04:05:06 PST", "allballs"])
        if k <= 5:
            return f"{r.randrange(1, 3000):04d}-{r.randrange(1, 13):02d}-{r.randrange(1, 29):02d} {r.randrange(24):02d}:00:00+00"
        if k == 6:
            return "2030-01-01 00:00:00+00"
        return self.text()

    def bigint(self):
        k = self.r.randrange(6)
        if k <= 2:
            return str(self.pick([0, 1, 2, 3, 10, 1000, -1, -2**63, 2**63 - 1, 2**31, 2**32]))
        if k == 3:
            return self.pick(["9223372036854775808", "-9223372036854775809", "1e3", "0x10", " 5 ", "5.5", "+7"])
        if k == 4:
            return str(self.r.randrange(-10**6, 10**6))
        return self.text()

    def boolean(self):
        return self.pick(["t", "f", "true", "false", "yes", "0", "1", "on"]) if self.chance(0.85) else self.text()

    def inet(self):
        r = self.r
        k = r.randrange(6)
        if k <= 1:
            return f"{r.randrange(256)}.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(256)}/{r.randrange(33)}"
        if k == 2:
            return ":".join("%x" % r.randrange(65536) for _ in range(8)) + f"/{r.randrange(129)}"
        if k == 3:
            return self.pick(["127.0.0.1", "::1", "0.0.0.0/0", "::/0", "::ffff:10.0.0.1", "10.0.0.1/33",
                              "1.2.3", "256.0.0.1", "fe80::1%eth0", "10.0.0.0/8", "192.168.0.1/24"])
        if k == 4:
            return "10.0.0.1"
        return self.text()

    def inet_array(self):
        return self.array(self.inet)

    def rate_limits(self):
        def one():
            req = self.pick(["10", "1", "0", "-1", "2147483647", "2147483648", "", "x", "1000000"])
            per = self.pick(["1 minute", "1 second", "0", "-1 s", "1 day", "100 years", "", "x",
                             "1 microsecond", "infinity"])
            return f'({req},"{per}")' if self.chance(0.9) else self.noise(6)
        return self.array(one, maxlen=4)

    def json_value(self, depth=4):
        r = self.r
        k = r.randrange(8 if depth > 0 else 5)
        if k == 0:
            return None
        if k == 1:
            return self.pick([True, False])
        if k == 2:
            return self.pick([0, -1, 1.5, 10**40, -(10**40), 1e308, 2**63])
        if k in (3, 4):
            return self.noise(r.choice([0, 3, 20]))
        if k in (5, 6):
            return {self.noise(r.choice([0, 4, 10])): self.json_value(depth - 1) for _ in range(r.randrange(5))}
        return [self.json_value(depth - 1) for _ in range(r.randrange(5))]

    def jsonb(self):
        r = self.r
        k = r.randrange(10)
        if k <= 4:
            return json.dumps({self.noise(r.choice([1, 5])): self.json_value() for _ in range(r.randrange(4))})
        if k == 5:
            return json.dumps(self.json_value())
        if k == 6:  # deep nesting
            d = self.pick([100, 1000, 6000])
            return '{"a":' * d + "1" + "}" * d
        if k == 7:  # just over / under 8 kB
            return json.dumps({"k": "x" * self.pick([8000, 8200, 20000, 100])})
        if k == 8:
            return self.pick(['{"a":"\\u0000"}', '{"a":1,"a":2}', "{", "[]", "null", '"str"', "1e999999",
                              '{"a":NaN}', "{'a':1}", '{"\\ud800":1}', ""])
        return self.text()
