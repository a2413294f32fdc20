"""A domain's retrains: the cycle, the gate, failures and back-off, status, the machine checks, the report."""
