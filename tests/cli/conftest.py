"""Rich draws error boxes at the terminal's width (80 columns without one) and wraps long temporary
paths inside them, splitting the words tests look for; a wide console keeps each message on one line."""

import pytest


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
