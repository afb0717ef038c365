"""The execution lifecycle core: storage, queue and the façade every service calls."""
