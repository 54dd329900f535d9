"""Stage-2 tests share fixtures.py's helpers; every module here runs its torch work on one thread."""

from tests.finetune.fixtures import one_thread  # noqa: F401  (autouse fixture)
