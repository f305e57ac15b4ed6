"""The paper's experiments as commands: debug-labels, approx-error, explain."""
