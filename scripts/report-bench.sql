-- Synthetic usage for scripts/report-bench.sh (examples/report_bench.rs):
-- events $1..$2 (of $3) of tenant $7, spread evenly over [$4, $5), on $6
-- users (user-0 ..), with allocated = $8. Written as the service writes
-- them (line items, draws, labels, UUIDv7 ids). Allocated events are filed
-- in the rollup by its insert trigger, as the ledger job's allocation
-- would file them; no ledger rows are written.
--
-- Mix (by event number): 60% token calls (input or cached input + output,
-- + reasoning for the reasoning model) over 6 models in 4 tiers, 10%
-- runtime minutes, 10% a task with app calls, 10% an HD image or a voice
-- call (a third labelled category "voice"), 10% unrated amounts (half
-- labelled category "tasks"). Cached input at 1.5 per million leaves
-- sub-micro-credit subtotals, so events carry rounding remainders.
INSERT INTO usage_events (event_id, tenant_id, account_id, reservation_id, kind, idempotency_key, payload_hash,
    amount, held, overdraft, draws, labels, hot_epoch, recorded_at, allocated, price_version, line_items)
SELECT ev.event_id, $7::text, ev.acct,
       CASE WHEN ev.kind = 'commit' THEN overlay(ev.event_id::text PLACING substr(md5(ev.i::text || 'h'), 1, 4) FROM 20)::uuid END,
       ev.kind, 'bench-' || ev.i, 'bench', ev.amount, ev.amount, 0,
       format('[{"account": "%s", "amount": "%s"}]', ev.acct, trim_scale(ev.amount))::jsonb,
       ev.labels, 'bench', ev.ts, $8::boolean, CASE WHEN ev.lines IS NOT NULL THEN 'd1.t0' END, ev.lines::jsonb
FROM (
  SELECT b2.i, b2.acct, b2.ts, b2.kind, b2.labels,
         (lpad(to_hex((extract(epoch FROM b2.ts) * 1000)::bigint), 12, '0') || '7' || substr(h.h, 1, 3) || '8'
            || substr(h.h, 4, 15))::uuid AS event_id,
         (ceil(COALESCE(b2.s1 + b2.s2 + COALESCE(b2.s3, 0), b2.plain) * 1000000) / 1000000)::numeric(24, 6) AS amount,
         CASE WHEN b2.s1 IS NULL THEN NULL
              WHEN b2.typ < 6 THEN '['
                 || format(b2.l, b2.m1, b2.model, '"' || b2.tier || '"', b2.q1, b2.p1, b2.per, trim_scale(b2.s1))
                 || ', ' || format(b2.l, 'output_tokens', b2.model, '"' || b2.tier || '"', b2.q2, b2.p2, b2.per, trim_scale(b2.s2))
                 || CASE WHEN b2.s3 IS NULL THEN '' ELSE ', '
                    || format(b2.l, 'reasoning_tokens', b2.model, '"' || b2.tier || '"', b2.q3, b2.p2, b2.per, trim_scale(b2.s3)) END
                 || ']'
              ELSE '[' || format(b2.l, b2.m1, '', 'null', b2.q1, b2.p1, 1, trim_scale(b2.s1))
                 || CASE WHEN b2.typ = 7 THEN ', ' || format(b2.l, 'app_calls', '', 'null', b2.q2, b2.p2, 1, trim_scale(b2.s2)) ELSE '' END
                 || ']'
         END AS lines
  FROM (
    SELECT b1.*, b1.q1 * b1.p1 / b1.per AS s1, b1.q2 * b1.p2 / b1.per AS s2, b1.q3 * b1.p2 / b1.per AS s3,
           '{"meter": "%s", "model": "%s", "tier": %s, "quantity": "%s", "unit_price": "%s", "per_units": %s, "subtotal": "%s"}' AS l
    FROM (
      SELECT b0.i, b0.typ, b0.acct, b0.ts, b0.kind, b0.labels, b0.plain, b0.model, b0.tier, b0.per,
             CASE WHEN b0.typ < 6 THEN CASE WHEN b0.i % 4 = 0 THEN 'cached_input_tokens' ELSE 'input_tokens' END
                  WHEN b0.typ = 6 THEN 'runtime_minutes' WHEN b0.typ = 7 THEN 'tasks'
                  WHEN b0.typ = 8 THEN CASE WHEN b0.i % 2 = 0 THEN 'image_hd' ELSE 'voice_minutes' END END AS m1,
             CASE WHEN b0.typ < 6 THEN (500 + (b0.i * 7919) % 20000)::numeric
                  WHEN b0.typ = 6 THEN trim_scale((b0.i % 600) / 10.0) ELSE 1 END AS q1,
             CASE WHEN b0.typ < 6 THEN CASE WHEN b0.i % 4 = 0 THEN trim_scale(b0.pin / 10) ELSE b0.pin END
                  WHEN b0.typ = 6 THEN 1 WHEN b0.typ = 7 THEN 0.25
                  ELSE CASE WHEN b0.i % 2 = 0 THEN 8 ELSE 3 END END AS p1,
             CASE WHEN b0.typ < 6 THEN (100 + (b0.i * 104729) % 4000)::numeric
                  WHEN b0.typ = 7 THEN (b0.i % 7)::numeric ELSE 0 END AS q2,
             CASE WHEN b0.typ < 6 THEN b0.pout WHEN b0.typ = 7 THEN 0.05 ELSE 0 END AS p2,
             CASE WHEN b0.typ < 6 AND b0.model = 'example-reasoning-1' THEN (b0.i % 3000)::numeric END AS q3
      FROM (
        SELECT i, (i % 10)::int AS typ,
               'user-' || ((i * 2654435761) % 4294967291 % $6) AS acct,
               $4::timestamptz + (i::float8 / $3) * ($5::timestamptz - $4::timestamptz) AS ts,
               CASE WHEN i % 10 < 8 THEN 'commit' ELSE 'charge' END AS kind,
               CASE WHEN i % 20 = 19 THEN '{"category": "tasks"}'::jsonb
                    WHEN i % 10 = 8 AND i % 3 = 0 THEN '{"category": "voice"}'::jsonb
                    ELSE '{}'::jsonb END AS labels,
               CASE WHEN i % 10 = 9 THEN ((i % 997) + 1)::numeric / 100 END AS plain,
               (ARRAY['example-fast-1', 'example-fast-mini', 'example-standard-1', 'example-advanced-1',
                      'example-reasoning-1', 'local-llama'])[1 + (i / 10) % 6] AS model,
               (ARRAY['fast', 'fast', 'standard', 'advanced', 'advanced', 'local'])[1 + (i / 10) % 6] AS tier,
               (ARRAY[15, 15, 150, 1500, 1500, 0])[1 + (i / 10) % 6]::numeric AS pin,
               (ARRAY[60, 60, 600, 6000, 6000, 0])[1 + (i / 10) % 6]::numeric AS pout,
               CASE WHEN i % 10 < 6 THEN 1000000 ELSE 1 END AS per
        FROM generate_series($1::bigint, $2::bigint) AS i
      ) AS b0
    ) AS b1
  ) AS b2, md5(b2.i::text) AS h(h)
) AS ev
