/*
 * pg_token_bench: a benchmark fixture, never installed outside bench/run.sh's throwaway
 * cluster. pgbench can only draw integers, so the benchmark needs the n-th test token as
 * one cheap SQL call (about 0.1 us) instead of a table lookup that would cost as much as the
 * thing being measured.
 *
 *   bench_token(prefix text, n bigint) -> text   the n-th deterministic, well-formed token:
 *       prefix + 22 base62 characters from splitmix64(n) + 6 base62 of CRC32(prefix+body),
 *       exactly the format of src/format.rs (bench/run.sh checks one against the extension)
 *   bench_id(n bigint) -> uuid                   the n-th token row's id
 */
#include "postgres.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/pg_crc.h"
#include "utils/uuid.h"

PG_MODULE_MAGIC;

static const char ALPHABET[] = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

static uint64
splitmix64(uint64 x)
{
	x += UINT64CONST(0x9E3779B97F4A7C15);
	x = (x ^ (x >> 30)) * UINT64CONST(0xBF58476D1CE4E5B9);
	x = (x ^ (x >> 27)) * UINT64CONST(0x94D049BB133111EB);
	return x ^ (x >> 31);
}

/* 11 base62 digits of v (62^11 > 2^64, so distinct v give distinct digits). */
static void
base62_11(uint64 v, char *out)
{
	for (int i = 10; i >= 0; i--)
	{
		out[i] = ALPHABET[v % 62];
		v /= 62;
	}
}

PG_FUNCTION_INFO_V1(bench_token);
Datum
bench_token(PG_FUNCTION_ARGS)
{
	text	   *prefix = PG_GETARG_TEXT_PP(0);
	int64		n = PG_GETARG_INT64(1);
	int			plen = VARSIZE_ANY_EXHDR(prefix);
	char		buf[64 + 22 + 6];
	pg_crc32	crc;
	uint32		c;

	if (plen > 64)
		ereport(ERROR, (errmsg("prefix too long")));
	memcpy(buf, VARDATA_ANY(prefix), plen);
	base62_11(splitmix64((uint64) n), buf + plen);
	base62_11(splitmix64((uint64) n ^ UINT64CONST(0x5DEECE66D)), buf + plen + 11);
	INIT_TRADITIONAL_CRC32(crc);
	COMP_TRADITIONAL_CRC32(crc, buf, plen + 22);
	FIN_TRADITIONAL_CRC32(crc);
	c = crc;
	for (int i = 5; i >= 0; i--)
	{
		buf[plen + 22 + i] = ALPHABET[c % 62];
		c /= 62;
	}
	PG_RETURN_TEXT_P(cstring_to_text_with_len(buf, plen + 28));
}

PG_FUNCTION_INFO_V1(bench_id);
Datum
bench_id(PG_FUNCTION_ARGS)
{
	uint64		n = (uint64) PG_GETARG_INT64(0);
	pg_uuid_t  *u = palloc0(sizeof(pg_uuid_t));

	u->data[6] = 0x40;			/* looks like a version-4 uuid */
	u->data[8] = 0x80;
	for (int i = 0; i < 6; i++)
		u->data[15 - i] = (n >> (8 * i)) & 0xFF;
	PG_RETURN_UUID_P(u);
}
