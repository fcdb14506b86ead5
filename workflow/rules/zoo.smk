# The embedded default's tiny model zoo: synthetic tasks, a base, and experts (CPU, seed only).

if config.get("zoo"):

    ZOO_EXPERTS = sorted(config["zoo"]["experts"])

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
            zoo=canonical({k: config["zoo"][k] for k in ("seed", "model", "base")}),
        threads: all_cores()
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
            ),
        threads: all_cores()
        resources:
            **CPU_JOB,
        log:
            "results/logs/zoo/{expert}.log",
        conda:
            CONDA_ENV
        script:
            "../scripts/zoo_expert.py"
