"""The task names users type (`task.name`), each with where its factory lives.

A table that imports nothing, so the config can check a name without importing a task
(`dphrl.config`), and `dphrl.tasks.get_task` builds the task from it.
"""

# name -> "module:factory"; a factory takes the task name and returns a Task.
TASKS: dict[str, str] = {
    "arith": "dphrl.tasks.arith:ArithTask",
    "arith_ood": "dphrl.tasks.arith:ArithTask",  # arith's out-of-domain set, for eval-passk
    "math": "dphrl.tasks.math:MathTask",
    "gsm8k": "dphrl.tasks.math:MathTask",
    "minisql": "dphrl.tasks.sql:SqlTask",
    "bird": "dphrl.tasks.sql:SqlTask",
    "spider": "dphrl.tasks.sql:SqlTask",
}
