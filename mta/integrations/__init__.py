"""MTA inside other libraries' trainers (each submodule needs its library: ``mta.integrations.trl``
needs ``trl``)."""
