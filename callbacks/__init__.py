"""Framework integrations for inrun (installed as ``inrun.callbacks``)."""
