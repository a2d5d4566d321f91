"""The machinery that runs passes: what a pass is (``pass_base``), when each applies
(``triggers``), the declared order (``order``), the fail-closed runner (``manager``) and the
graph checks after each pass (``validation``).  No pass lives here."""
