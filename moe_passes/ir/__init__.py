"""The graph vocabulary and the canonical IR every pass reads.

``facts``: what a node is and does (values, collectives, waits, mutation, dims, modules), in
torch IR and ATen IR alike. ``canonical``: Dynamo's graph re-traced to pre-dispatch ATen in
its own fake mode, where the analyses run. ``capture``: the graphs Dynamo would hand a
backend, without compiling. ``graph_text``: normalised, run-stable graph text. ``autograd``: which values a training
step's autograd saves or differentiates. ``fake_mode``: the fake mode a graph re-runs in, entered one way.
Nothing here imports Inductor or any pass.
"""
