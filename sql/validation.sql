-- pg_token: the validation entry points, hand-declared because they are plain V1 C functions
-- (src/validation.rs and src/v1.rs explain why). Not STRICT: a NULL token is judged
-- (malformed) and recorded like any other refusal. VOLATILE: a verdict depends on the clock
-- and on the latest committed state, and a validation queues a last-use update.

CREATE FUNCTION token.validate_token(
    token           text,
    caller_token    text DEFAULT NULL,
    required_scope  text DEFAULT NULL
) RETURNS token.identity
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pg_token_validate_token';
COMMENT ON FUNCTION token.validate_token(text, text, text) IS
    'The token''s identity, or SQLSTATE 28000 naming the reason it is refused';

CREATE FUNCTION token.check_token(
    token           text,
    caller_token    text DEFAULT NULL,
    required_scope  text DEFAULT NULL
) RETURNS token.verdict
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pg_token_check_token';
COMMENT ON FUNCTION token.check_token(text, text, text) IS
    'The same decision as validate_token, as a row (valid, reason, identity); never raises for a refusal';

CREATE FUNCTION token.authenticate(
    token           text,
    caller_token    text DEFAULT NULL,
    required_scope  text DEFAULT NULL
) RETURNS token.identity
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pg_token_authenticate';
COMMENT ON FUNCTION token.authenticate(text, text, text) IS
    'validate_token, then binds the identity to the current transaction for row-level security';

-- The same three, for a trusted gateway (token_gateway) that states the end client's address:
-- behind a pooler or an HTTP layer the connection's own address is the gateway's, so a token
-- bound to networks would be judged against the wrong address.
CREATE FUNCTION token.validate_token_from(
    client_addr     inet,
    token           text,
    caller_token    text DEFAULT NULL,
    required_scope  text DEFAULT NULL
) RETURNS token.identity
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pg_token_validate_token_from';
COMMENT ON FUNCTION token.validate_token_from(inet, text, text, text) IS
    'validate_token judged as if the client connected from client_addr (token_gateway)';

CREATE FUNCTION token.check_token_from(
    client_addr     inet,
    token           text,
    caller_token    text DEFAULT NULL,
    required_scope  text DEFAULT NULL
) RETURNS token.verdict
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pg_token_check_token_from';
COMMENT ON FUNCTION token.check_token_from(inet, text, text, text) IS
    'check_token judged as if the client connected from client_addr (token_gateway)';

CREATE FUNCTION token.authenticate_from(
    client_addr     inet,
    token           text,
    caller_token    text DEFAULT NULL,
    required_scope  text DEFAULT NULL
) RETURNS token.identity
    LANGUAGE c VOLATILE PARALLEL UNSAFE
    AS 'MODULE_PATHNAME', 'pg_token_authenticate_from';
COMMENT ON FUNCTION token.authenticate_from(inet, text, text, text) IS
    'authenticate judged as if the client connected from client_addr (token_gateway)';

-- PARALLEL RESTRICTED: parallel workers do not share the backend memory the identity is in.
CREATE FUNCTION token.current_identity() RETURNS token.identity
    LANGUAGE c STABLE PARALLEL RESTRICTED
    AS 'MODULE_PATHNAME', 'pg_token_current_identity';
COMMENT ON FUNCTION token.current_identity() IS
    'The identity bound by token.authenticate in this transaction, or NULL';
