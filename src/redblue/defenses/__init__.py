"""Defences: adversarial-training recipes (adversarial.py) and backdoor detection (backdoor.py)."""
