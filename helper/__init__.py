"""ASD: Attention Shifting Distillation against backdoored teachers, and the field's defenses on one engine.

The groups, lowest first; a module imports only from its own group and the ones before it (tests/test_layout.py):

    run       a run's life: errors, device set-up, run folder and logs, checkpoints, resume, shared flags
    data      datasets and augmentation, the trigger, the teacher folder
    train     the engine, losses, schedules, hooked features, evaluation, perturbation searches
    report    plots, tables, aggregation, attention maps, figures
    attacks   the teachers: ADBA, BadNets / Blended / clean
    defenses  ASD and the baselines, one file each, and distri.py's parser
    jobs      what the entry scripts run: a defense run, re-tuning, the scan, the table runner, the demo, the benchmark
"""
