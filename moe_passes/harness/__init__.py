"""Running models to get graphs, apart from the passes: Dynamo's graphs without compiling
(``capture``) and one process standing in for an expert-parallel group (``fake_group``).
Used by the CLI, the benches and the tests; no pass imports it."""
