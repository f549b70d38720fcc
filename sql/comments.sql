-- pg_token: a comment on every function and type, so that \df+ token.* and \dT+ token.* say
-- what each one is for. (Tables, views and the V1 functions carry theirs where they are made.)
-- The upgrade script repeats this file: an upgraded database must read the same.

COMMENT ON TYPE token.identity IS
    'What validate_token and authenticate return and current_identity reads: the token''s id, account, key type, environment, scopes, name, expiry, end of grace and metadata';
COMMENT ON TYPE token.verdict IS
    'What check_token returns: valid, the refusal reason, and the identity columns when valid';

COMMENT ON FUNCTION token.create_key_type(text, text, text[], interval, interval, text[], boolean, inet[], token.rate_limit[], boolean, boolean) IS
    'Defines a kind of key: which key types its tokens may validate, TTLs, allowed scopes, networks, rate limits, whether cross_account is concealed, whether reuse of a rotated-away token revokes its family (token_admin)';
COMMENT ON FUNCTION token.register_prefix(text, text, text) IS
    'Registers a token prefix for a key type in an environment; no prefix may start another (token_admin)';
COMMENT ON FUNCTION token.unregister_prefix(text) IS
    'Removes a prefix and revokes every token that carries it (token_admin)';
COMMENT ON FUNCTION token.restore_prefix_tokens(text) IS
    'Brings back the tokens unregister_prefix revoked, under the prefix''s current registration (token_admin)';
COMMENT ON FUNCTION token.generate_token(text, text, text, text[], interval, jsonb, text, bigint, bigint, interval, token.rate_limit[], inet[]) IS
    'Issues a token for an account under a key type, optionally capped, rate-limited or bound to networks; returns its id and the token, shown this once (token_admin)';
COMMENT ON FUNCTION token.derive_token(uuid, text, text[], interval, jsonb, bigint, token.rate_limit[], inet[]) IS
    'Issues a child of a token: at most its scopes, expiry and networks; refused once any ancestor is revoked, disabled or expired (token_admin)';
COMMENT ON FUNCTION token.derive_own_token(text, text, text[], interval, jsonb, bigint, token.rate_limit[], inet[]) IS
    'derive_token by presenting the parent token instead of its id (token_admin; grant it to let holders derive their own)';
COMMENT ON FUNCTION token.update_token(uuid, text, text[], jsonb, timestamptz, bigint, bigint, interval, token.rate_limit[], inet[], text[]) IS
    'Changes a live token in place: name, scopes, metadata, expiry, usage cap, rate limits, networks; unset names fields to clear (token_admin)';
COMMENT ON FUNCTION token.disable_token(uuid, text) IS
    'Refuses a token (disabled) from every session''s next call until enable_token; who and why are recorded (token_admin)';
COMMENT ON FUNCTION token.enable_token(uuid) IS
    'Lets a disabled token validate again (token_admin)';
COMMENT ON FUNCTION token.token_uses(uuid) IS
    'A capped token''s uses, exactly: left in the table plus reserved in shared memory, and its refill (token_admin)';
COMMENT ON FUNCTION token.report_leaked(text[]) IS
    'For secret scanners: revokes every reported token that exists here (reason leaked); one row per input with its hint and outcome (token_reporter, token_admin)';
COMMENT ON FUNCTION token.scanner_patterns() IS
    'Per registered prefix, a regular expression that finds its tokens in text (token_reporter, token_admin)';
COMMENT ON FUNCTION token.rotate_token(uuid, interval) IS
    'Issues a successor; the old token keeps validating for the grace period (token_admin)';
COMMENT ON FUNCTION token.rotate_own_token(text, interval) IS
    'Rotation by presenting the current token instead of its id (token_admin; grant it to let applications rotate their own)';
COMMENT ON FUNCTION token.revoke_token(uuid, text) IS
    'Revokes one token at once: refused by the very next validation in every session (token_admin)';
COMMENT ON FUNCTION token.revoke_token_tree(uuid, text) IS
    'Revokes a token and every token rotated from it, at once: the incident-response call (token_admin)';
COMMENT ON FUNCTION token.revoke_account_tokens(text, text) IS
    'Revokes every live token of an account, in any spelling of it (token_admin)';
COMMENT ON FUNCTION token.hash_token(text) IS
    'SHA-256 of a token: what token.tokens stores';
COMMENT ON FUNCTION token.reasons() IS
    'Every refusal reason with a one-line explanation';
COMMENT ON FUNCTION token.canonical_account(text) IS
    'An account id''s one spelling, as pg_token stores and compares it (''00042'' -> ''42'', uuids lowercase)';
COMMENT ON FUNCTION token.cache_stats() IS
    'This backend''s validation cache: entries, bytes, budget, hits and misses (token_validator)';
COMMENT ON FUNCTION token.shared_cache_stats() IS
    'The validation cache all backends share: capacity, bytes, whether this session uses it, hits and fills since server start (token_admin, pg_monitor)';
COMMENT ON FUNCTION token.current_account() IS
    'The account of the identity authenticate bound in this transaction, or NULL (for policies)';
COMMENT ON FUNCTION token.current_account_uuid() IS
    'current_account() as a uuid, or NULL when it is not one (for policies on uuid tenant keys)';
COMMENT ON FUNCTION token.current_account_bigint() IS
    'current_account() as a bigint, or NULL when it is not one (for policies on bigint tenant keys)';
COMMENT ON FUNCTION token.current_token_id() IS
    'The id of the token authenticate bound in this transaction, or NULL';
COMMENT ON FUNCTION token.current_key_type() IS
    'The key type of the token authenticate bound in this transaction, or NULL';
COMMENT ON FUNCTION token.current_scopes() IS
    'The scopes of the token authenticate bound in this transaction, or NULL';
COMMENT ON FUNCTION token.has_scope(text) IS
    'Whether the token authenticate bound in this transaction carries a scope; false when unauthenticated';
COMMENT ON FUNCTION token.purge_events(interval) IS
    'Deletes events older than an interval (default token.event_retention), recorded; below token.min_event_retention superuser only';
COMMENT ON FUNCTION token.flush_events(interval) IS
    'Waits until the event writer has written every refusal and last-use update queued so far in this database (token_admin)';
COMMENT ON FUNCTION token.worker_status() IS
    'The event writers per database: refusals counted, written, pending, folded, dropped; rows; last-use updates (token_admin)';
COMMENT ON FUNCTION token.metrics() IS
    'One row for monitoring: validations, refusals, cache hits and misses since server start, and this database''s event writer (token_admin, pg_monitor)';
COMMENT ON FUNCTION token.refusal_metrics() IS
    'Refusals by reason since server start, for monitoring (token_admin, pg_monitor)';
COMMENT ON FUNCTION token.invalidate_caches() IS
    'pg_token''s cache trigger: a change to key types, prefixes or legacy issuers, or a truncation of tokens, empties every backend''s validation cache';
COMMENT ON FUNCTION token.note_token_change() IS
    'pg_token''s cache trigger on tokens: a changed or deleted token is dropped from every backend''s validation cache, and only it';
COMMENT ON FUNCTION token.register_legacy_issuer(text, text[], text, text, text, timestamptz, text, text, text, text, text, interval) IS
    'Registers a legacy JWT issuer (HS256 secret, or RS256/ES256 public keys): its JWTs validate, marked deprecated, until cutoff_at (token_admin)';
COMMENT ON FUNCTION token.alter_legacy_issuer(text, timestamptz, text, text[], text) IS
    'Changes a legacy issuer''s cut-off, migration message, or algorithms and key; NULL leaves a field as it is (token_admin)';
COMMENT ON FUNCTION token.drop_legacy_issuer(text) IS
    'Removes a legacy issuer, its key and revocations: its JWTs are refused as unknown_issuer (token_admin)';
COMMENT ON FUNCTION token.revoke_legacy_jwt(text, text, text) IS
    'Revokes one legacy JWT by its issuer and jti, from every session''s next call (token_admin)';
COMMENT ON FUNCTION token.exchange_legacy_jwt(text, text) IS
    'Verifies a legacy JWT and issues an opaque token for its account and scopes, once per JWT (token_validator)';
