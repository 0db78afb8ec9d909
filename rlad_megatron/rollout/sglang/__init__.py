"""SGLang rollout engines: `engine.SGLangEngine` over a colocated (in-process) or remote (HTTP) transport.

Importing this package needs neither sglang nor a GPU."""
