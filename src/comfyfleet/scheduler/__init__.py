"""The job scheduler: which queued job goes to which instance, and the wake-ups that make
an idle agent's long-poll answer within milliseconds of a submit."""
