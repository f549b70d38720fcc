# pg_token on a real streaming hot standby.
#
# An application session on the standby validates tokens (and caches them); the primary
# revokes or rotates them; once the standby has replayed the commit, the same session refuses
# them on its next call, because the relcache invalidation queued by the statement triggers
# is replayed from the commit record. Refusals on the standby raise 28000 and are logged only
# (a standby cannot write token.events); issuing a token there fails as read-only (25006).
#
# Run by tests/standby/run.sh (prove, as the postgres user). Every plaintext token is
# appended to $PGT_TOKENS for the leak check, and never appears in a command line, a query
# text this script logs, or a test name: sessions read tokens from environment variables
# with psql's \getenv, so the regress log shows only :'variables'.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);

my $tokens_file = $ENV{PGT_TOKENS}
  or BAIL_OUT('PGT_TOKENS must name the file that collects generated tokens');

my $settings = <<'EOF';
shared_preload_libraries = 'pg_token'
token.environment = 'dev'
token.last_used_interval = 1
# The only relcache invalidations are then the test's own (it counts cache entries).
autovacuum = off
EOF

my $primary = PostgreSQL::Test::Cluster->new('primary');
$primary->init(allows_streaming => 1);
$primary->append_conf('postgresql.conf', $settings);
$primary->start;

$primary->safe_psql('postgres', 'CREATE DATABASE app');
$primary->safe_psql(
	'app', q{
	CREATE EXTENSION pg_token;
	CREATE ROLE sb_app LOGIN;
	GRANT token_validator TO sb_app;
	SELECT token.create_key_type('agent');
	SELECT token.register_prefix('sb-', 'agent', 'dev');
	SELECT token.create_key_type('fam', reuse_detection => true);
	SELECT token.register_prefix('sbf-', 'fam', 'dev');
	CREATE ROLE sb_flood LOGIN;
	GRANT token_validator TO sb_flood;
	ALTER ROLE sb_flood SET token.max_refusal_rate = 50;
});

# Issues a token on the primary; returns (id, token) and records the token.
sub generate
{
	my ($account, $name, $key_type) = @_;
	$key_type //= 'agent';
	my $row = $primary->safe_psql('app',
		"SELECT token_id, token FROM token.generate_token('$account', '$key_type', name => '$name')");
	my ($id, $token) = split /\|/, $row;
	die "generate_token returned no token" unless $token;
	record($token);
	return ($id, $token);
}

# Rotates on the primary; returns the successor's (id, token) and records the token.
sub rotate
{
	my ($id, $grace) = @_;
	my $row = $primary->safe_psql('app',
		"SELECT token_id, token FROM token.rotate_token('$id', grace => '$grace')");
	my ($new_id, $token) = split /\|/, $row;
	die "rotate_token returned no token" unless $token;
	record($token);
	return ($new_id, $token);
}

sub record
{
	open my $fh, '>>', $tokens_file or die "cannot append to $tokens_file: $!";
	print $fh "$_[0]\n";
	close $fh;
}

my %token;
my %id;
($id{revoked}, $token{revoked}) = generate('acme', 'revoked-on-primary');
($id{no_grace}, $token{no_grace}) = generate('acme', 'rotated-without-grace');
($id{grace}, $token{grace}) = generate('acme', 'rotated-with-grace');
($id{kept}, $token{kept}) = generate('acme', 'stays-valid');
for my $i (1 .. 8)
{
	($id{"bulk$i"}, $token{"bulk$i"}) = generate('bulk', "bulk-$i");
}
my @bulk = map { "bulk$_" } 1 .. 8;
# A rotation family under reuse detection: fam0 rotated to fam1 with an hour of grace.
($id{fam0}, $token{fam0}) = generate('famacct', 'family-first', 'fam');
($id{fam1}, $token{fam1}) = rotate($id{fam0}, '1 hour');

# A token with its last (checksum) character changed: well formed, bad checksum.
my $last = substr($token{kept}, -1);
$token{bad_checksum} = substr($token{kept}, 0, -1) . ($last eq 'A' ? 'B' : 'A');

$primary->backup('backup');
my $standby = PostgreSQL::Test::Cluster->new('standby');
$standby->init_from_backup($primary, 'backup', has_streaming => 1);
$standby->start;
$primary->wait_for_catchup($standby);

is( $standby->safe_psql(
		'app',
		"SELECT pg_is_in_recovery(), current_setting('shared_preload_libraries'), "
		  . "current_setting('token.environment'), current_setting('hot_standby')"),
	't|pg_token|dev|on',
	'the standby is a hot standby with the primary\'s pg_token settings');

# The application's long-lived session on the standby: a token_validator, not a superuser.
# Tokens reach it through its environment (\getenv), never through the logged query text.
my $session;
{
	local %ENV = %ENV;
	$ENV{"PGT_TOKEN_\U$_"} = $token{$_} for keys %token;
	$session = $standby->background_psql('app',
		on_error_stop => 0,
		extra_params => [ '-U', 'sb_app' ]);
}
$session->query_safe(join "\n", map { "\\getenv $_ PGT_TOKEN_\U$_" } sort keys %token);
my $pid = $session->query_safe('SELECT pg_backend_pid()');

# Runs SQL in the session; returns (stdout, stderr). Errors do not end the session.
sub in_session
{
	my ($sql) = @_;
	my $out = $session->query($sql);
	my $err = $session->{stderr};
	$session->{stderr} = '';
	return ($out, $err);
}

# The session's verdict on a token: 'valid' or the refusal reason.
sub verdict
{
	my ($name) = @_;
	my ($out, $err) = in_session(
		"SELECT CASE WHEN valid THEN 'valid' ELSE reason END FROM token.check_token(:'$name')");
	die "check_token failed: $err" if $err ne '';
	return $out;
}

sub cached
{
	my ($out, $err) = in_session('SELECT entries FROM token.cache_stats()');
	die "cache_stats failed: $err" if $err ne '';
	return $out;
}

sub replay_primary
{
	$primary->wait_for_catchup($standby, 'replay', $primary->lsn('insert'));
}

is(verdict($_), 'valid', "standby: $_ token valid")
  for qw(revoked no_grace grace kept), @bulk;
is(cached(), 12, 'standby: the session caches the 12 tokens it validated');

# 1. Revoke on the primary: the session's cache is emptied by the replayed invalidation.
$primary->safe_psql('app', "SELECT token.revoke_token('$id{revoked}', 'leaked')");
replay_primary();
is(cached(), 0, 'standby: replaying the revoke emptied the session\'s cache');
is(verdict('revoked'), 'revoked', 'standby: the revoked token is refused by the same session');
my ($out, $err) = in_session(
	"SELECT account FROM token.validate_token(:'revoked');\n\\echo :LAST_ERROR_SQLSTATE");
is($out, '28000', 'standby: validate_token raises SQLSTATE 28000 for the revoked token');
like($err, qr/ERROR:  token rejected: revoked/, 'standby: ... with the reason in the message');
is(verdict('kept'), 'valid', 'standby: the other tokens stay valid');

# 2. Rotation without grace: the old token is refused at once, its successor is valid.
is(verdict('no_grace'), 'valid', 'standby: the token to rotate is valid (and cached)');
my (undef, $successor) = rotate($id{no_grace}, '0');
replay_primary();
is(verdict('no_grace'), 'revoked', 'standby: a token rotated without grace is refused');
{
	local $ENV{PGT_TOKEN_SUCCESSOR} = $successor;
	is( $standby->safe_psql(
			'app',
			"\\getenv successor PGT_TOKEN_SUCCESSOR\n"
			  . "SELECT valid, account FROM token.check_token(:'successor')",
			extra_params => [ '-U', 'sb_app' ]),
		't|acme',
		'standby: its successor is valid');
}

# 3. Rotation with a grace period: valid until it ends, then refused by the clock alone
#    (the entry cached after the replay carries revoke_after; no invalidation is involved).
my $grace = 3;
my $rotated_at = time;
rotate($id{grace}, "$grace seconds");
replay_primary();
SKIP:
{
	skip 'replay took longer than the grace period', 2 if time - $rotated_at > $grace - 0.5;
	is(verdict('grace'), 'valid', 'standby: a rotated token is valid during its grace period');
	cmp_ok(cached(), '>=', 1, 'standby: ... and cached');
}
my $refused;
while (time - $rotated_at < $grace + 30)
{
	$refused = verdict('grace');
	last if $refused ne 'valid';
	usleep(100_000);
}
my $refused_after = time - $rotated_at;
is($refused, 'revoked', 'standby: a rotated token is refused once its grace period ends');
cmp_ok($refused_after, '>=', $grace, 'standby: ... and not before');

# 4. Revoking every token of an account: each cached entry goes.
is(verdict($_), 'valid', "standby: $_ token valid before the account is revoked") for @bulk;
is($primary->safe_psql('app', "SELECT token.revoke_account_tokens('bulk', 'offboarded')"),
	'8', 'primary: revoke_account_tokens revoked 8 tokens');
replay_primary();
is(verdict($_), 'revoked', "standby: $_ token refused after the account was revoked") for @bulk;

# 5. Refusals on the standby raise 28000, are logged (not written; the first of each key in a
#    window), and break nothing.
my $log_offset = -s $standby->logfile;
($out, $err) = in_session(
	"SELECT account FROM token.validate_token('not-a-token');\n\\echo :LAST_ERROR_SQLSTATE");
is($out, '28000', 'standby: a malformed token raises 28000');
like($err, qr/ERROR:  token rejected: malformed/, 'standby: ... as malformed');
($out, $err) = in_session(
	"SELECT account FROM token.validate_token(:'bad_checksum');\n\\echo :LAST_ERROR_SQLSTATE");
is($out, '28000', 'standby: a token with a bad checksum raises 28000');
like($err, qr/ERROR:  token rejected: bad_checksum/, 'standby: ... as bad_checksum');
is(verdict('bad_checksum'), 'bad_checksum', 'standby: check_token returns the reason without raising');
is(verdict('kept'), 'valid', 'standby: the session still validates after the refusals');
is($session->query_safe('SELECT pg_backend_pid()'), $pid, 'standby: ... in the same backend');
$standby->wait_for_log(qr/pg_token: refused .*reason=bad_checksum/, $log_offset);
ok($standby->log_contains(qr/pg_token: refused .*reason=malformed/, $log_offset),
	'standby: refusals are written to the server log');
# The first refusal of a key in a window is logged, its repeats are not: a flood on a standby
# cannot fill its log either.
in_session("SELECT count(*) FROM generate_series(1, 200), token.check_token('not-a-token');");
is($session->query_safe('SELECT 1'), '1', 'standby: 200 more refusals of the same key');
my $malformed_lines = () = slurp_file($standby->logfile, $log_offset) =~ /pg_token: refused .*reason=malformed/g;
is($malformed_lines, 1, 'standby: ... and still one log line for that key');
my $standby_log = slurp_file($standby->logfile, $log_offset);
unlike($standby_log, qr/could not start its event writer|pg_token writer|terminated by signal|PANIC/,
	'standby: no event writer is started and no process fails');
is($primary->safe_psql('app', "SELECT count(*) FROM token.events WHERE event = 'refused'"),
	'0', 'primary: refusals on the standby are not in token.events');

# 6. Every function that writes fails on the standby as read-only, even for a superuser.
for my $case (
	[ 'generate_token', "SELECT token_id FROM token.generate_token('acme', 'agent')" ],
	[ 'rotate_token',   "SELECT token_id FROM token.rotate_token('$id{kept}')" ],
	[ 'revoke_token',   "SELECT token.revoke_token('$id{kept}')" ],
	[ 'revoke_account_tokens', "SELECT token.revoke_account_tokens('acme')" ],
	[ 'create_key_type', "SELECT token.create_key_type('other')" ],
	[ 'register_prefix', "SELECT token.register_prefix('sbx-', 'agent', 'dev')" ],
	[ 'unregister_prefix', "SELECT token.unregister_prefix('sb-')" ],
	[ 'purge_events',   "SELECT token.purge_events('1 day')" ])
{
	my ($name, $sql) = @$case;
	my ($ret, $stdout, $stderr) = $standby->psql('app',
		"$sql;\n\\echo :LAST_ERROR_SQLSTATE", on_error_stop => 0);
	is($stdout, '25006', "standby: $name fails with SQLSTATE 25006 (read-only transaction)");
	like($stderr, qr/ERROR:  cannot execute .+ (in a read-only transaction|during recovery)/,
		"standby: ... with a read-only message");
}
is(verdict('kept'), 'valid', 'standby: the token is unchanged');
is($primary->safe_psql('app', "SELECT status FROM token.token_list WHERE id = '$id{kept}'"),
	'active', 'primary: the token is unchanged');

# 7. Reuse detection on a standby: a rotated-away token presented after its grace window
#    cannot revoke its family there (nothing can be written), so the standby refuses the whole
#    family itself, until it restarts, and logs the line an operator needs to revoke it on the
#    primary, where nothing has changed.
is(verdict('fam1'), 'valid', 'standby: the family\'s current token is valid (and cached)');
$log_offset = -s $standby->logfile;
$primary->safe_psql('app',
	"UPDATE token.tokens SET revoke_after = now() - interval '1 second' WHERE id = '$id{fam0}'");
replay_primary();
is(verdict('fam0'), 'family_revoked', 'standby: the rotated-away token, reused after its grace, is family_revoked');
is(verdict('fam1'), 'family_revoked', 'standby: ... and so is its family\'s current token, in the same session');
{
	local %ENV = %ENV;
	$ENV{PGT_TOKEN_FAM1} = $token{fam1};
	my ($ret, $stdout, $stderr) = $standby->psql('app',
		"\\getenv fam1 PGT_TOKEN_FAM1\nSELECT CASE WHEN valid THEN 'valid' ELSE reason END FROM token.check_token(:'fam1')",
		extra_params => [ '-U', 'sb_app' ]);
	is($stdout, 'family_revoked', 'standby: ... and in a new session');
}
ok($standby->log_contains(
		qr/pg_token: family_revoked \(standby: not written\) .*family=$id{fam0} reused_token_id=$id{fam0}.*revoke_token_tree\('$id{fam0}'\)/,
		$log_offset),
	'standby: the log tells the operator to revoke the family on the primary');
is($primary->safe_psql('app',
		"SELECT count(*) FROM token.tokens WHERE family_id = '$id{fam0}' AND family_revoked_at IS NOT NULL"),
	'0', 'primary: nothing was revoked there');
is($primary->safe_psql('app', "SELECT status FROM token.token_list WHERE id = '$id{fam1}'"),
	'active', 'primary: the family\'s current token is still active');

# 8. The refusal tarpit holds on a standby: a role capped at 50 refusals a second (ALTER ROLE on
#    the primary, replayed) makes at most 50 * (2 + 1) + 1 refusals in 2 seconds of garbage
#    tokens, where an unheld backend makes tens of thousands; its valid token never waits.
{
	my ($ret, $stdout, $stderr) = $standby->psql('app', q{
		DO $$
		DECLARE n int := 0; stop timestamptz := clock_timestamp() + interval '2 seconds';
		BEGIN
		  WHILE clock_timestamp() < stop LOOP
		    PERFORM 1 FROM token.check_token('sb-' || md5(n::text)) c WHERE NOT c.valid;
		    n := n + 1;
		  END LOOP;
		  RAISE NOTICE 'refusals=%', n;
		END $$;
		SELECT current_setting('token.max_refusal_rate');},
		extra_params => [ '-U', 'sb_flood' ]);
	is($stdout, '50', 'standby: the capped role\'s sessions run with token.max_refusal_rate = 50');
	my ($refusals) = $stderr =~ /refusals=(\d+)/;
	ok(defined $refusals && $refusals >= 50 && $refusals <= 50 * 3 + 1 + 10,
		'standby: a garbage flood is held at the cap (' . ($refusals // 'none') . ' refusals in 2 s)');
}

# 9. The shared cache exists on the standby (same settings) but is never used there: no trigger
# runs on a standby, so nothing would remove a replayed change from it.
is($standby->safe_psql('app',
		'SELECT capacity > 0, enabled, hits_total, fills_total FROM token.shared_cache_stats()'),
	't|f|0|0', 'standby: the shared cache is not used (no hit, no row added after all of the above)');

$session->quit;
done_testing();
