"""thinklens.probes (see the open issues; nothing public yet)."""
