-- Everything pg_token puts in a database, one line per fact, with no OIDs: run in a database
-- upgraded with ALTER EXTENSION pg_token UPDATE and in one with a fresh CREATE EXTENSION,
-- the two outputs must be equal (tests/e2e/test_upgrade.py). What a line may hold: the
-- object's identity, its definition as Postgres prints it, its privileges and its comment.
-- Column order counts (SELECT * and COPY see it), so columns are listed by position among the
-- columns that are not dropped.
WITH members AS (
    SELECT d.classid, d.objid, o.type, o.identity
    FROM pg_catalog.pg_depend d
    JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
    CROSS JOIN LATERAL pg_catalog.pg_identify_object(d.classid, d.objid, 0) o
    WHERE e.extname = 'pg_token' AND d.deptype = 'e'
),
facts(line) AS (
    -- every member object, with its comment
    SELECT pg_catalog.format('member %s %s comment=%s', m.type, m.identity,
                             pg_catalog.obj_description(m.objid, (SELECT c.relname FROM pg_catalog.pg_class c WHERE c.oid = m.classid)))
    FROM members m
    UNION ALL
    -- functions: the whole definition (language, volatility, security, settings, symbol) and ACL
    SELECT pg_catalog.format('function %s def=%s acl=%s', m.identity, pg_catalog.pg_get_functiondef(p.oid),
                             (SELECT pg_catalog.array_agg(a ORDER BY a::text) FROM pg_catalog.unnest(p.proacl) a))
    FROM members m JOIN pg_catalog.pg_proc p ON p.oid = m.objid
    WHERE m.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
    UNION ALL
    -- relations: kind, options, ACL, RLS flags, replica identity
    SELECT pg_catalog.format('relation %s kind=%s options=%s acl=%s rls=%s/%s replident=%s persistence=%s',
                             m.identity, c.relkind, c.reloptions,
                             (SELECT pg_catalog.array_agg(a ORDER BY a::text) FROM pg_catalog.unnest(c.relacl) a),
                             c.relrowsecurity, c.relforcerowsecurity, c.relreplident, c.relpersistence)
    FROM members m JOIN pg_catalog.pg_class c ON c.oid = m.objid
    WHERE m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
    UNION ALL
    -- columns of tables, views and composite types, by position among live columns
    SELECT pg_catalog.format('column %s #%s %s %s notnull=%s default=%s identity=%s generated=%s collation=%s acl=%s comment=%s',
                             c.oid::pg_catalog.regclass,
                             pg_catalog.row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum),
                             a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
                             pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), a.attidentity, a.attgenerated,
                             a.attcollation::pg_catalog.regcollation,
                             (SELECT pg_catalog.array_agg(x ORDER BY x::text) FROM pg_catalog.unnest(a.attacl) x),
                             pg_catalog.col_description(c.oid, a.attnum))
    FROM members m
    JOIN pg_catalog.pg_class c ON c.oid = m.objid AND m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
    JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
    UNION ALL
    -- composite types' columns (their relation is not itself an extension member)
    SELECT pg_catalog.format('typecolumn %s #%s %s %s', t.typname,
                             pg_catalog.row_number() OVER (PARTITION BY t.oid ORDER BY a.attnum),
                             a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod))
    FROM members m
    JOIN pg_catalog.pg_type t ON t.oid = m.objid AND m.classid = 'pg_catalog.pg_type'::pg_catalog.regclass
    JOIN pg_catalog.pg_attribute a ON a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
    WHERE t.typtype = 'c'
    UNION ALL
    -- constraints, indexes and triggers of member tables
    SELECT pg_catalog.format('constraint %s %s %s', co.conrelid::pg_catalog.regclass, co.conname,
                             pg_catalog.pg_get_constraintdef(co.oid))
    FROM members m JOIN pg_catalog.pg_constraint co ON co.conrelid = m.objid
    WHERE m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
    UNION ALL
    SELECT pg_catalog.format('index %s', pg_catalog.pg_get_indexdef(i.indexrelid))
    FROM members m JOIN pg_catalog.pg_index i ON i.indrelid = m.objid
    WHERE m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
    UNION ALL
    SELECT pg_catalog.format('trigger %s enabled=%s', pg_catalog.pg_get_triggerdef(tg.oid), tg.tgenabled)
    FROM members m JOIN pg_catalog.pg_trigger tg ON tg.tgrelid = m.objid AND NOT tg.tgisinternal
    WHERE m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
    UNION ALL
    SELECT pg_catalog.format('policy %s on %s %s', po.polname, po.polrelid::pg_catalog.regclass,
                             pg_catalog.pg_get_expr(po.polqual, po.polrelid))
    FROM members m JOIN pg_catalog.pg_policy po ON po.polrelid = m.objid
    WHERE m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
    UNION ALL
    -- views: their query
    SELECT pg_catalog.format('view %s %s', c.oid::pg_catalog.regclass, pg_catalog.pg_get_viewdef(c.oid))
    FROM members m JOIN pg_catalog.pg_class c ON c.oid = m.objid AND c.relkind IN ('v', 'm')
    WHERE m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
    UNION ALL
    -- sequences: their parameters
    SELECT pg_catalog.format('sequence %s %s %s %s %s %s %s', s.seqrelid::pg_catalog.regclass, s.seqtypid::pg_catalog.regtype,
                             s.seqstart, s.seqincrement, s.seqmax, s.seqmin, s.seqcycle)
    FROM members m JOIN pg_catalog.pg_sequence s ON s.seqrelid = m.objid
    WHERE m.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
    UNION ALL
    -- the schema's privileges, and what pg_dump dumps of the extension's tables
    SELECT pg_catalog.format('schema token acl=%s comment=%s',
                             (SELECT pg_catalog.array_agg(a ORDER BY a::text) FROM pg_catalog.unnest(n.nspacl) a),
                             pg_catalog.obj_description(n.oid, 'pg_namespace'))
    FROM pg_catalog.pg_namespace n WHERE n.nspname = 'token'
    UNION ALL
    SELECT pg_catalog.format('dumped %s where=%s', c::pg_catalog.regclass, w)
    FROM pg_catalog.pg_extension e,
         ROWS FROM (pg_catalog.unnest(e.extconfig), pg_catalog.unnest(e.extcondition)) AS x(c, w)
    WHERE e.extname = 'pg_token'
    UNION ALL
    SELECT pg_catalog.format('extension version=%s relocatable=%s schema=%s', e.extversion, e.extrelocatable,
                             e.extnamespace::pg_catalog.regnamespace)
    FROM pg_catalog.pg_extension e WHERE e.extname = 'pg_token'
)
SELECT line FROM facts ORDER BY line;
