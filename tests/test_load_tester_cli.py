"""Options of the load tester: scenario presets, overrides, and clear errors before anything is sent."""
from __future__ import annotations

import pytest

from load_tester.cli import EXIT_USAGE, build_parser, main, resolve_plan, run_settings
from load_tester.config import Defaults
from load_tester.scenarios import MAX_REQUESTS, generate_requests
from tests.harness import free_port


def plan_of(*argv: str):
    parser = build_parser(Defaults())
    return resolve_plan(parser, parser.parse_args(argv))


def usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        plan_of(*argv)
    assert exit_info.value.code == EXIT_USAGE
    return capsys.readouterr().err


def test_a_scenario_sets_the_shape_and_explicit_options_override_it():
    plan = plan_of("--scenario", "high")
    assert (plan.requests, plan.concurrency, plan.ramp_up_seconds, plan.open_loop) == (500, 50, 120.0, False)
    plan = plan_of(
        "--scenario", "high", "--requests", "20", "--ramp-up", "1", "--amount-range", "1", "2", "--seed", "9"
    )  # fmt: skip
    assert (plan.requests, plan.concurrency, plan.ramp_up_seconds) == (20, 50, 1.0)
    assert (plan.amount_min_kw, plan.amount_max_kw, plan.seed) == (1.0, 2.0, 9)


def test_rush_hour_is_the_default_and_without_a_seed_one_is_chosen_and_kept():
    plan = plan_of()
    assert (plan.scenario, plan.requests, plan.concurrency, plan.ramp_up_seconds) == ("rush-hour", 100, 100, 0.0)
    assert (plan.amount_min_kw, plan.amount_max_kw, plan.session_seconds) == (5.0, 20.0, 60.0)
    assert isinstance(plan.seed, int) and plan.seed >= 0


def test_sustained_is_open_loop_at_the_given_rate():
    plan = plan_of("--scenario", "sustained", "--rate", "7.5", "--duration", "30")
    assert (plan.open_loop, plan.arrival_rate, plan.duration_seconds, plan.requests) == (True, 7.5, 30.0, MAX_REQUESTS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--rate", "3"), "--rate applies only to --scenario sustained"),
        (("--scenario", "sustained", "--ramp-up", "3"), "--ramp-up does not apply to --scenario sustained"),
        (("--amount-range", "20", "5"), "the minimum 20 is above the maximum 5"),
        (("--amount-range", "0", "5"), "0 is outside the allowed range (0, 350]"),
        (("--concurrency", "0"), "0 is outside the allowed range [1, 1000]"),
        (("--requests", "many"), "'many' is not a whole number"),
        (("--max-error-rate", "1.5"), "1.5 is outside the allowed range [0, 1]"),
        (("--max-rejection-rate", "-0.1"), "-0.1 is outside the allowed range [0, 1]"),
        (("--session-duration", "nan"), "nan is outside the allowed range"),
        (("--scenario", "lunch"), "invalid choice: 'lunch'"),
        (("--policies", "round_robin"), "--policies chooses the policies of --compare-policies"),
        (("--compare-policies", "--compare-allocation", "strict"), "choose one of them"),
        (("--derate-at", "3"), "--derate-at applies only to --scenario derate"),
        (("--derate-substation", "substation-1"), "--derate-substation applies only to --scenario derate"),
        (("--scenario", "derate", "--derate-for", "0"), "0 is outside the allowed range (0, 86400]"),
        (("--substation-sample-hz", "0"), "0 is outside the allowed range (0, 100]"),
        (("--compare-allocation", ","), "name at least one allocation policy"),
    ],
)
def test_bad_options_are_refused_with_a_sentence_that_names_them(capsys, argv, message):
    assert message in usage_error(capsys, *argv)


def test_by_default_no_request_may_fail_and_any_may_be_rejected_for_capacity():
    parser = build_parser(Defaults())
    args = parser.parse_args([])
    assert (args.max_error_rate, args.max_rejection_rate) == (0.0, 1.0)
    args = parser.parse_args(["--max-error-rate", "0.05", "--max-rejection-rate", "0"])
    plan = resolve_plan(parser, args)
    settings = run_settings(plan, generate_requests(plan), args)
    assert (settings["max_error_rate"], settings["max_rejection_rate"]) == (0.05, 0.0)
    assert (settings["requests"], settings["max_requests"]) == (100, None)


def test_the_settings_of_a_sustained_run_name_the_arrivals_planned_and_the_cap_apart():
    parser = build_parser(Defaults())
    args = parser.parse_args(["--scenario", "sustained", "--rate", "5", "--duration", "4", "--seed", "12"])
    plan = resolve_plan(parser, args)
    planned = generate_requests(plan)
    settings = run_settings(plan, planned, args)
    # About 5/s for 4 s: the arrivals drawn, not the cap of 100,000.
    assert settings["requests"] == len(planned) and 5 <= len(planned) <= 40
    assert settings["max_requests"] == MAX_REQUESTS


def test_policies_are_accepted_with_compare_policies():
    parser = build_parser(Defaults())
    args = parser.parse_args(["--compare-policies", "--policies", "round_robin, least_loaded"])
    resolve_plan(parser, args)
    assert args.policies == ("round_robin", "least_loaded")


def test_the_environment_sets_the_defaults_and_options_win():
    environ = {"LOADTEST_TARGET_URL": "http://charge:5000", "LOADTEST_BALANCER_URL": "http://lb:5002",
               "LOADTEST_OUTPUT_DIR": "/results", "ADMIN_TOKEN": "t"}  # fmt: skip
    parser = build_parser(Defaults.from_env(environ))
    args = parser.parse_args([])
    assert (args.target, args.balancer, str(args.output)) == ("http://charge:5000", "http://lb:5002", "/results")
    assert parser.parse_args(["--target", "http://127.0.0.1:5000"]).target == "http://127.0.0.1:5000"
    assert Defaults.from_env(environ).admin_token == "t"
    assert Defaults.from_env({}) == Defaults()


def test_an_unreachable_target_is_a_clear_error_and_nothing_is_written(tmp_path, capsys):
    target = f"http://127.0.0.1:{free_port()}"
    code = main(["--target", target, "--output", str(tmp_path / "out"), "--no-progress"], environ={})
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"cannot reach the charge request service at {target}" in err and "--target" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_compare_policies_without_an_admin_token_says_which_variable_to_set(tmp_path, capsys):
    code = main(["--compare-policies", "--output", str(tmp_path)], environ={})
    assert code == EXIT_USAGE
    assert "set ADMIN_TOKEN" in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_created_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["--output", str(blocker / "results")], environ={})
    assert code == EXIT_USAGE
    assert f"cannot create the output folder {blocker / 'results'}" in capsys.readouterr().err


def test_wait_and_the_substation_sample_rate_are_in_the_plan_and_the_settings():
    parser = build_parser(Defaults())
    args = parser.parse_args(["--wait", "--substation-sample-hz", "50"])
    plan = resolve_plan(parser, args)
    settings = run_settings(plan, generate_requests(plan), args)
    assert (plan.wait, settings["wait"], settings["substation_sample_hz"]) == (True, True, 50.0)
    assert settings["derate"] is None
    args = parser.parse_args([])
    assert (resolve_plan(parser, args).wait, args.substation_sample_hz) == (False, 20.0)


def test_the_derate_scenario_is_rush_hour_with_a_derate_relative_to_the_session_length():
    plan = plan_of("--scenario", "derate", "--session-duration", "8")
    assert (plan.requests, plan.concurrency, plan.ramp_up_seconds) == (100, 100, 0.0)
    assert (plan.derate.at_seconds, plan.derate.for_seconds, plan.derate.substation) == (2.0, 2.0, None)
    plan = plan_of("--scenario", "derate", "--derate-at", "1.5", "--derate-for", "4", "--derate-substation", "s-2")
    assert (plan.derate.at_seconds, plan.derate.for_seconds, plan.derate.substation) == (1.5, 4.0, "s-2")
    assert plan_of("--scenario", "rush-hour").derate is None


def test_compare_allocation_takes_a_list_or_nothing_for_every_policy():
    parser = build_parser(Defaults())
    assert parser.parse_args(["--compare-allocation", "strict, fair_share"]).compare_allocation == (
        "strict", "fair_share"
    )
    assert parser.parse_args(["--compare-allocation"]).compare_allocation == ()
    assert parser.parse_args([]).compare_allocation is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compare-allocation", "strict,fair_share"], "--compare-allocation switches the substations' allocation"),
        (["--scenario", "derate"], "--scenario derate lowers a substation's limit (PUT /limit): set ADMIN_TOKEN"),
    ],
)
def test_operator_runs_without_an_admin_token_say_which_variable_to_set(tmp_path, capsys, argv, message):
    code = main([*argv, "--output", str(tmp_path)], environ={})
    assert code == EXIT_USAGE
    assert message in capsys.readouterr().err
