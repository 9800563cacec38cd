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
  first and the substations last.

Nothing here restarts anything itself: supervisord does.
"""
