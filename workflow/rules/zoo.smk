# The embedded default's tiny model zoo: synthetic tasks, a base, and experts (CPU, seed only).

if config.get("zoo"):

    ZOO_EXPERTS = sorted(config["zoo"]["experts"])
    # Pinned kernels (zoo.kernels: avx2) train on one thread: a thread count splits reductions
    # differently. They join the params only where set, so the native zoo's jobs stand as they were.
    ZOO_KERNELS = {} if config["zoo"]["kernels"] == "native" else {"kernels": config["zoo"]["kernels"]}
    ZOO_THREADS = all_cores() if not ZOO_KERNELS else 1

    rule zoo_tasks:
        output:
            [str(p) for p in zoo_task_files(config).values()],
        params:
            zoo=canonical({k: config["zoo"][k] for k in ("seed", "tasks", "task_items")}),
        resources:
            **CPU_JOB,
        log:
            "results/logs/zoo/tasks.log",
        conda:
            CONDA_ENV
        script:
            "../scripts/zoo_tasks.py"

    rule zoo_base:
        output:
            directory("results/zoo/base"),
        params:
            zoo=canonical({k: config["zoo"][k] for k in ("seed", "model", "base")} | ZOO_KERNELS),
        threads: ZOO_THREADS
        resources:
            **CPU_JOB,
        log:
            "results/logs/zoo/base.log",
        conda:
            CONDA_ENV
        script:
            "../scripts/zoo_base.py"

    rule zoo_expert:
        input:
            "results/zoo/base",
        output:
            model=directory("results/zoo/{expert}"),
            checkpoints=directory("results/zoo/checkpoints/{expert}"),
        wildcard_constraints:
            expert="|".join(ZOO_EXPERTS),
        params:
            zoo=lambda wc: canonical(
                {
                    "seed": config["zoo"]["seed"],
                    "checkpoint_every": config["zoo"]["checkpoint_every"],
                    "experts": config["zoo"]["experts"],
                }
                | ZOO_KERNELS
            ),
        threads: ZOO_THREADS
        resources:
            **CPU_JOB,
        log:
            "results/logs/zoo/{expert}.log",
        conda:
            CONDA_ENV
        script:
            "../scripts/zoo_expert.py"
