"""`custom_dataset: !function hooks.<name>` targets of the task YAMLs here (lm-eval passes the task's
metadata as keyword arguments; the documents do not depend on it)."""

from abqllm.eval.tasks import dataset


def abq_lastword(**_metadata):
    return dataset("abq_lastword")


def abq_nextsent(**_metadata):
    return dataset("abq_nextsent")
