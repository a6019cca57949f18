"""The reads that are statements of their own (the writes are functions of the schema,
`schema.py`), with `{s}` for the store's schema."""

from __future__ import annotations

LATEST_SQL = """
SELECT data FROM (
  SELECT i.data, i.seq, sum(octet_length(i.data)) OVER newest - octet_length(i.data) AS before
  FROM {s}.items AS i JOIN {s}.sessions AS s USING (store, session_id)
  WHERE i.store = $1 AND i.session_id = $2 AND i.branch = $5 AND ($3::float8 IS NULL OR
        s.updated_at > now() - make_interval(secs => $3::float8))
  WINDOW newest AS (ORDER BY i.seq DESC ROWS UNBOUNDED PRECEDING)
  ORDER BY i.seq DESC LIMIT $4
) AS w WHERE $6::int8 IS NULL OR before <= $6 ORDER BY seq DESC
"""
"""The newest items while those before each fit `max_bytes` (see `latest`): a running sum
of their sizes, which Postgres takes without reading a stored value (nor sends the rows
it leaves out)."""
USAGE_SQL = """
SELECT branch, turn, requests, input_tokens, output_tokens, total_tokens, input_details,
       output_details
FROM {s}.usage WHERE store = $1 AND session_id = $2 AND ($3::text IS NULL OR branch = $3)
ORDER BY branch COLLATE "C", turn
"""
USER_TURNS_SQL = """
SELECT turn, data, extract(epoch FROM created_at) FROM {s}.items
WHERE store = $1 AND session_id = $2 AND branch = $3 AND kind = 'user' ORDER BY turn
"""
