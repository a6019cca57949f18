"""Compaction: a long history replaced by the model's summary of it, atomically, with the
original items kept.

The Agents SDK's `OpenAIResponsesCompactionSession` decides after each turn whether to
call the Responses API's `responses.compact` and then swaps the stored history for its
output with a clear followed by an append, from the agent process. Here the sidecar
does it (`api`): it reads the branch, decides as the SDK does (`policy`), calls the
model with the key only it holds (`model`), and the driver replaces exactly the items
it read, in one transaction or script, only if none of them changed meanwhile. Items
appended during the model call stay after the summary; two sidecars compacting one
session at once replace it once; a crash or a failed call leaves it as it was. What was
replaced moves to the branch's archive, readable with `view=full` and exported.
"""
