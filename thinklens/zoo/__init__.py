"""The model zoo: the bundled organism and its task."""
