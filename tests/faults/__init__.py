"""The fault suite (issue 6): real processes killed and stopped by PID while clients stream; every request
completes, is retried before its first token, or ends with an explicit error."""
