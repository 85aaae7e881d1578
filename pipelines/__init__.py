"""Beam and tf.Transform graph code run by the components. No argument parsing, no params files."""
