"""Reference models the passes are proven on: ``moe_passes.models.interns1_vl``."""
