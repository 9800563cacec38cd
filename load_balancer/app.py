"""Application factory of the load balancer."""
from __future__ import annotations

import os
from dataclasses import dataclass

from flask import Flask

from gridcommon.httpclient import HttpClient
from gridcommon.logs import configure_logging
from gridcommon.openapi import install_openapi
from gridcommon.web import install_common
from load_balancer.config import Settings
from load_balancer.lost_answers import LostAnswers
from load_balancer.metrics import BalancerMetrics
from load_balancer.openapi_spec import SPEC
from load_balancer.policies import make_policy
from load_balancer.poller import Poller
from load_balancer.registry import SubstationRegistry
from load_balancer.router import Router
from load_balancer.routes import EXTENSION_KEY, admin, api
from load_balancer.view import GridView

USER_AGENT = "smart-grid-load-balancer/load_balancer"


@dataclass(frozen=True)
class Balancer:
    """Everything one balancer app runs on, wired together."""

    settings: Settings
    view: GridView
    metrics: BalancerMetrics
    poller: Poller
    router: Router
    registry: SubstationRegistry

    def stop(self) -> None:
        self.poller.stop()
        self.router.close()


def build_balancer(settings: Settings) -> Balancer:
    view = GridView(
        failure_threshold=settings.failure_threshold,
        ejection_base_seconds=settings.ejection_base_seconds,
        ejection_max_seconds=settings.ejection_max_seconds,
    )
    metrics = BalancerMetrics(view.snapshots, view.now, settings.poll_interval_seconds)
    # The router refreshes through the poller, and the poller frees lost sessions through the
    # router: the poller reaches the router through a function first called once both exist.
    poller = Poller(
        view,
        HttpClient(USER_AGENT, timeout=(settings.connect_timeout_seconds, settings.poll_timeout_seconds)),
        interval_seconds=settings.poll_interval_seconds,
        refresh_min_interval_seconds=settings.refresh_min_interval_seconds,
        observe_duration=metrics.polling_duration.observe,
        after_successful_poll=lambda url: router.free_lost_sessions(url),
        max_metrics_bytes=settings.max_metrics_bytes,
        # Room for every substation's poll at once, and for the lost-session work polls hand on.
        parallel_polls=2 * settings.max_substations,
    )
    router = Router(
        view,
        HttpClient(USER_AGENT, timeout=(settings.connect_timeout_seconds, settings.forward_timeout_seconds)),
        refresh=poller.refresh,
        policy=make_policy(settings.routing_policy),
        poll_interval_seconds=settings.poll_interval_seconds,
        on_admitted=metrics.count_admission,
        on_forward_failure=metrics.count_forward_failure,
        lost_answers=LostAnswers(),
        on_lost_session_freed=metrics.count_lost_session_freed,
        longest_session_seconds=settings.max_session_seconds,
        deadline_seconds=settings.route_deadline_seconds,
        refresh_seconds=poller.round_timeout,
        tail=settings.tail_settings(),
        on_hedge=metrics.count_hedge,
    )
    metrics.watch_forward_timing(router.timing)
    registry = SubstationRegistry(
        view,
        poller,
        on_removed=metrics.forget_substation,
        allow=settings.url_allow_list(),
        max_substations=settings.max_substations,
    )
    registry.add_configured(settings.substations)
    return Balancer(settings, view, metrics, poller, router, registry)


def create_app(settings: Settings | None = None, start_background: bool = True) -> Flask:
    """The balancer app; ``start_background=False`` leaves the poller off (tests)."""
    settings = settings or Settings.from_env(os.environ)
    configure_logging("load_balancer", settings.log_level, settings.log_sampling)
    balancer = build_balancer(settings)

    app = Flask(__name__)
    install_common(app)
    app.extensions[EXTENSION_KEY] = balancer

    app.register_blueprint(api)
    app.register_blueprint(admin)
    install_openapi(app, SPEC)
    if start_background:
        balancer.poller.start()
    return app
