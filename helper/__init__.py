"""ASD: Attention Shifting Distillation against backdoored teachers. Building blocks of the entry scripts."""
