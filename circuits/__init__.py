"""thinklens.circuits (see the open issues; nothing public yet)."""
