"""`tokenbus bench`: ramped streaming load against a proxy, one module per job (as vLLM's `vllm/benchmarks/`).

run: the command (flags, the run, its outputs); loadgen: the C++ client, tokenbus-loadgen; python_client: the
fallback client; report: percentiles, per-stage results and their tables; cpu: `--cpu-pids`; vs_vllm: tokenbus
against vLLM's own server.
"""
