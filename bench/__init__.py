"""Benchmark harness: convostore's sidecar against the Agents SDK's own sessions.

`python -m bench` starts private Redis and PostgreSQL servers and a real sidecar
process per backend, runs every scenario against `SidecarSession` and against the SDK's
`SQLiteSession`, `RedisSession` and `SQLAlchemySession` (asyncpg) on the same servers in
the same run, and writes `bench/RESULTS.md`. Figures are ratios measured side by side:
this machine is shared and noisy, so absolute numbers mean little across runs.
"""
