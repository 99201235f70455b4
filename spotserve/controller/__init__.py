"""Controller: request manager, instance manager, backend interface and the policy glue (pure Python)."""
