"""Transport adapters the api uses to reach other services (implementations of logic.ports)."""
