"""Guards: bad samples, non-finite steps, budgets, rollback, localisation and preflight."""
