"""Local mode (`make run`): the Procfile's processes under supervisord.

The Procfile stays the one place that says what runs locally. `python -m localrun`
reads it, writes a supervisord configuration under .run/supervisor/ (one small
shell script per process, so no command is quoted twice), and runs supervisord in
the foreground:

* every process is restarted when it dies, with supervisord's back-off (see
  ``localrun.supervisor``), while the others keep running;
* every line a process writes reaches the terminal prefixed by its name
  (``localrun/output.py``, a supervisord event listener);
* Ctrl-C, SIGTERM or SIGHUP (the terminal closing) stops everything, the charge API
  first and the substations last, and `make run` returns once every process has stopped;
* one runs at a time: a lock under .run/supervisor/, held until supervisord has stopped
  everything, makes a second `make run` say which one runs (or is still stopping) and exit;
* what the processes and supervisord write (state, logs) is yours alone (umask 077; the
  services also create their state 0600 in a 0700 folder themselves).

Nothing here restarts anything itself: supervisord does.
"""
