"""rlvr.tracking: logging a stage's inputs when another run logs the same ones at the same moment."""

import pytest

from rlvr import tracking


def test_an_input_logged_by_two_runs_at_once_is_retried_not_fatal():
    import mlflow
    from mlflow.exceptions import MlflowException

    class Store:
        calls = 0

        def log_input(self, dataset, context):
            Store.calls += 1
            if Store.calls == 1:  # what the server answered when another run inserted the dataset first
                raise MlflowException('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key value violates '
                                      'unique constraint "dataset_pk"')

    fake = type("FakeMlflow", (), {"exceptions": mlflow.exceptions, "log_input": Store().log_input})
    dataset = type("Dataset", (), {"name": "data/prepared/eval"})()
    tracking.log_input(fake, dataset)
    assert Store.calls == 2

    def broken(dataset, context):
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run not found")

    fake.log_input = staticmethod(broken)
    with pytest.raises(MlflowException, match="run not found"):  # anything else is not retried
        tracking.log_input(fake, dataset)
