#!/usr/bin/env python3
"""Start the moto server (pinned in requirements.txt) with fixes the system tests rely on.

Usage: launch_moto.py [moto.server.main arguments], e.g. ``launch_moto.py -H 127.0.0.1 -p 5123``.
Set MOTO_PORT to the same port: state machines executed by moto call SQS, DynamoDB, ...
through http://localhost:$MOTO_PORT.

Each patch below checks that what it replaces still exists and has the shape it expects, and
exits non-zero otherwise: a moto upgrade must break loudly, never silently drop a fix.

Auto Scaling: moto has groups, lifecycle hooks and SetInstanceProtection but no
CompleteLifecycleAction or RecordLifecycleActionHeartbeat; patch_lifecycle_actions adds both,
validated as AWS validates them. Tests read what the agent did in two ways:
  * DescribeAutoScalingInstances: a completed action moves the instance to
    `Terminating:Proceed` (as on AWS), and a second heartbeat or completion is refused;
  * GET /moto-api/rsql/lifecycle-actions (a test-only path on this server, not an AWS API):
    a JSON list of every RecordLifecycleActionHeartbeat and CompleteLifecycleAction call, in
    order, refused ones included, each {"op", "group", "hook", "instance", "result", "time"
    (Unix seconds, float), "error" (null, or the ValidationError's message)}.
"""

import inspect
import json
import os
import sys
import threading
import time

import moto
from moto import server
from moto.stepfunctions import responses

EXPECTED_MOTO = "5.2.5"


def die(message: str) -> None:
    sys.stderr.write(f"launch_moto.py: {message} (moto {moto.__version__})\n")
    sys.exit(3)


def patch_send_task_failure_cause() -> None:
    """Pass SendTaskFailure's `cause` on to the backend.

    moto 5.2.5's StepFunctionResponse.send_task_failure reads only `taskToken` and `error`,
    although the executing backend (StepFunctionsParserBackend.send_task_failure) accepts a
    `cause` and carries it through CallbackOutcomeFailure into the TaskFailed event, the
    Catch's `$.Cause`, and DescribeExecution's `cause` when the failure is not caught. Real
    AWS keeps the cause; tests assert on it.
    """
    cls = responses.StepFunctionResponse
    if not callable(getattr(cls, "send_task_failure", None)):
        die("StepFunctionResponse.send_task_failure is gone; re-check the cause patch")
    from moto.stepfunctions.models import StepFunctionBackend

    params = inspect.signature(StepFunctionBackend.send_task_failure).parameters
    if "cause" in params:
        # The upstream base signature grew a cause: the bug may be fixed; re-check the patch.
        die("StepFunctionBackend.send_task_failure already takes `cause`; re-check the patch")
    from moto.stepfunctions.parser.models import StepFunctionsParserBackend

    if "cause" not in inspect.signature(StepFunctionsParserBackend.send_task_failure).parameters:
        die("StepFunctionsParserBackend.send_task_failure takes no `cause`; re-check the patch")

    def send_task_failure(self):  # type: ignore[no-untyped-def]
        task_token = self._get_param("taskToken")
        error = self._get_param("error")
        cause = self._get_param("cause")
        backend = self.stepfunction_backend
        if isinstance(backend, StepFunctionsParserBackend):
            backend.send_task_failure(task_token, error=error, cause=cause)
        else:
            # Not executing state machines: the base backend ignores callbacks anyway.
            backend.send_task_failure(task_token, error=error)
        return responses.EmptyResult()

    cls.send_task_failure = send_task_failure


def patch_task_token_lifecycle() -> None:
    """Close a waitForTaskToken token when its attempt ends, and give each Retry a new token.

    moto 5.2.5 mints one token when a Task state is entered and keeps its callback endpoint
    open for the life of the execution, so unlike AWS:
      * SendTaskHeartbeat / SendTaskSuccess on the token of a task that already succeeded,
        failed or timed out answer 200 while the execution is still running (e.g. after a
        Catch or during a Retry), and SendTaskFailure answers 200 even after the execution
        ended;
      * every Retry attempt re-sends the *same* token.
    AWS rejects a closed token and mints a token per attempt; the agent's cancellation
    (heartbeat says closed -> kill the job) and its lock rules (same token = redelivery, new
    token = new attempt) depend on both.

    moto's backend already rejects a token whose endpoint has a `consumer_error` (nothing in
    moto ever sets one), so: wrap one attempt (ExecutionState._evaluate_with_timeout) of a
    waitForTaskToken task, mint a fresh token first when the current one is already closed
    (a Retry), and close the token when the attempt ends, however it ends. moto then answers
    TaskDoesNotExist for it (its `isinstance(..., CallbackConsumerTimeout)` test looks at the
    wrapping exception, so it never picks TaskTimedOut), or InvalidToken for heartbeat and
    success once the execution has ended. All three mean "closed" to the agent.
    """
    from moto.core.exceptions import AWSError
    from moto.stepfunctions.parser import api
    from moto.stepfunctions.parser.asl.component.state.exec.execute_state import ExecutionState
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.resource import (
        ResourceCondition,
    )
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service.state_task_service_callback import (  # noqa: E501
        StateTaskServiceCallback,
    )
    from moto.stepfunctions.parser.asl.eval.callback.callback import (
        CallbackConsumerTimeout,
        CallbackEndpoint,
        CallbackPoolManager,
    )
    from moto.stepfunctions.parser.asl.eval.states import ContextObject
    from moto.stepfunctions.parser.models import StepFunctionsParserBackend

    for owner, attr in [
        (ExecutionState, "_evaluate_with_timeout"),
        (CallbackEndpoint, "report"),
        (CallbackPoolManager, "get"),
        (CallbackPoolManager, "add"),
        (ContextObject, "update_task_token"),
    ]:
        if not callable(getattr(owner, attr, None)):
            die(f"{owner.__name__}.{attr} is gone; re-check the task token patch")
    if "_evaluate_with_timeout" in StateTaskServiceCallback.__dict__:
        die("StateTaskServiceCallback overrides _evaluate_with_timeout; re-check the patch")
    for method in [CallbackPoolManager.heartbeat, CallbackPoolManager.notify]:
        if "consumer_error" not in inspect.getsource(method):
            die(f"CallbackPoolManager.{method.__name__} ignores consumer_error; re-check")
    for op in ["send_task_heartbeat", "send_task_success", "send_task_failure"]:
        if "TaskDoesNotExist()" not in inspect.getsource(getattr(StepFunctionsParserBackend, op)):
            die(f"StepFunctionsParserBackend.{op} changed; re-check the task token patch")

    # moto's TaskDoesNotExist (and TaskTimedOut) have no default message, so raising them
    # bare, as its backend does, crashes into an HTTP 500. Give them AWS's messages.
    for cls, message in [
        (api.TaskDoesNotExist, "Task Does Not Exist: 'Provided task does not exist anymore'"),
        (api.TaskTimedOut, "Task Timed Out: 'Provided task does not exist anymore'"),
    ]:
        if not issubclass(cls, AWSError) or "__init__" in cls.__dict__:
            die(f"{cls.__name__} changed shape; re-check the task token patch")

        def __init__(self, message=message, code=cls.code, status=cls.status_code):  # type: ignore[no-untyped-def]
            AWSError.__init__(self, message, code, status)

        cls.__init__ = __init__

    attempt = ExecutionState._evaluate_with_timeout

    def _evaluate_with_timeout(self, env):  # type: ignore[no-untyped-def]
        if self.resource.condition != ResourceCondition.WaitForTaskToken:
            return attempt(self, env)
        context = env.states.context_object
        pool = env.callback_pool_manager
        endpoint = pool.get(context.context_object_data["Task"]["Token"])
        if endpoint is None or endpoint.consumer_error is not None:
            pool.add(context.update_task_token())
        token = context.context_object_data["Task"]["Token"]
        try:
            return attempt(self, env)
        finally:
            endpoint = pool.get(token)
            if endpoint is not None and endpoint.consumer_error is None:
                endpoint.report(CallbackConsumerTimeout())

    StateTaskServiceCallback._evaluate_with_timeout = _evaluate_with_timeout


def patch_start_execution_default_name() -> None:
    """Name an execution started without a name with a fresh UUID, as AWS does.

    With execute_state_machine on, moto 5.2.5 names it `None` (ARN `...:None`), so a second
    nameless StartExecution on the same state machine fails with ExecutionAlreadyExists.
    """
    import uuid

    from moto.stepfunctions.parser.models import StepFunctionsParserBackend

    start = StepFunctionsParserBackend.start_execution
    params = list(inspect.signature(start).parameters)
    if params[:3] != ["self", "state_machine_arn", "name"]:
        die(f"StepFunctionsParserBackend.start_execution{params} changed; re-check the patch")

    def start_execution(self, state_machine_arn, name=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        return start(self, state_machine_arn, name or str(uuid.uuid4()), *args, **kwargs)

    StepFunctionsParserBackend.start_execution = start_execution


# Every lifecycle action call, in order (see the module docstring). One server process serves
# one test, so a module-level list is the whole record.
LIFECYCLE_ACTIONS: list[dict] = []
LIFECYCLE_ACTIONS_PATH = "/moto-api/rsql/lifecycle-actions"


def patch_lifecycle_actions() -> None:
    """Add CompleteLifecycleAction and RecordLifecycleActionHeartbeat to moto's Auto Scaling.

    moto 5.2.5 stores groups, their instances and lifecycle hooks, but answers these two
    actions with "not yet implemented" (its AutoScalingResponse has no method for them). AWS
    refuses, with a ValidationError, an action whose group does not exist, whose hook is not
    a hook of that group, whose instance is not in that group or whose action is no longer
    pending, and a LifecycleActionResult other than CONTINUE or ABANDON; so does this.

    The action is pending until it is completed: moto never puts an instance in
    `Terminating:Wait` (it terminates at once), so any instance of the group that was not
    completed yet counts as waiting. Completing moves it to `Terminating:Proceed`, which
    DescribeAutoScalingInstances then shows. Only InstanceId is supported, not
    LifecycleActionToken (moto issues no tokens); a call with a token alone is refused.
    """
    from moto.autoscaling.exceptions import ValidationError
    from moto.autoscaling.models import AutoScalingBackend, InstanceState
    from moto.autoscaling.responses import AutoScalingResponse
    from moto.core.responses import EmptyResult
    from moto.moto_api._internal import urls as moto_api_urls

    for op in ["complete_lifecycle_action", "record_lifecycle_action_heartbeat"]:
        if hasattr(AutoScalingResponse, op):
            die(f"AutoScalingResponse.{op} exists now; drop or re-check the lifecycle patch")
    for attr in ["autoscaling_groups", "lifecycle_hooks"]:
        if attr not in inspect.getsource(AutoScalingBackend.__init__):
            die(f"AutoScalingBackend has no {attr}; re-check the lifecycle patch")
    if "f\"{as_name}_{name}\"" not in inspect.getsource(AutoScalingBackend.create_lifecycle_hook):
        die("AutoScalingBackend keys lifecycle hooks differently; re-check the lifecycle patch")
    if "lifecycle_state" not in inspect.signature(InstanceState.__init__).parameters:
        die("InstanceState has no lifecycle_state; re-check the lifecycle patch")
    if not isinstance(getattr(moto_api_urls, "url_paths", None), dict):
        die("moto.moto_api._internal.urls.url_paths is gone; re-check the lifecycle patch")

    proceed = "Terminating:Proceed"

    def act(self, op: str, result: str | None) -> None:  # type: ignore[no-untyped-def]
        group_name = self._get_param("AutoScalingGroupName")
        hook_name = self._get_param("LifecycleHookName")
        instance_id = self._get_param("InstanceId")
        entry = {
            "op": op,
            "group": group_name,
            "hook": hook_name,
            "instance": instance_id,
            "result": result,
            "time": time.time(),
            "error": None,
        }
        LIFECYCLE_ACTIONS.append(entry)

        def refuse(message: str) -> None:
            entry["error"] = message
            raise ValidationError(message)

        backend = self.autoscaling_backend
        group = backend.autoscaling_groups.get(group_name or "")
        if group is None:
            refuse(f"AutoScalingGroup name not found - {group_name}")
        if not hook_name or f"{group_name}_{hook_name}" not in backend.lifecycle_hooks:
            refuse(f"No Lifecycle Hook found with name {hook_name} for group {group_name}")
        if not instance_id:
            refuse("InstanceId is required (this emulator issues no LifecycleActionToken)")
        state = next((s for s in group.instance_states if s.instance.id == instance_id), None)
        if state is None:
            refuse(f"Instance {instance_id} is not part of Auto Scaling group {group_name}")
        if state.lifecycle_state == proceed:
            refuse(f"No active Lifecycle Action found with instance ID {instance_id}")
        if op == "CompleteLifecycleAction":
            if result not in ("CONTINUE", "ABANDON"):
                refuse(
                    f"Value '{result}' at 'lifecycleActionResult' failed to satisfy "
                    "constraint: Member must be CONTINUE or ABANDON"
                )
            state.lifecycle_state = proceed

    def complete_lifecycle_action(self):  # type: ignore[no-untyped-def]
        act(self, "CompleteLifecycleAction", self._get_param("LifecycleActionResult"))
        return EmptyResult()

    def record_lifecycle_action_heartbeat(self):  # type: ignore[no-untyped-def]
        act(self, "RecordLifecycleActionHeartbeat", None)
        return EmptyResult()

    AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action
    AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat

    def lifecycle_actions(request, full_url, headers):  # type: ignore[no-untyped-def]
        return 200, {"Content-Type": "application/json"}, json.dumps(LIFECYCLE_ACTIONS)

    # Read when the moto-api app is first built, on the first /moto-api request: after this.
    moto_api_urls.url_paths["{0}" + LIFECYCLE_ACTIONS_PATH + "$"] = lifecycle_actions


def exit_with_parent() -> None:
    """Exit when the process that started us dies (RSQL_MOTO_PARENT_PID names it).

    The test harness kills moto when it is dropped, but a test process that is itself
    SIGKILLed (or aborts) cannot; without this an orphaned server would outlive it. Polled,
    because PR_SET_PDEATHSIG fires when the *thread* that forked exits, and test threads do.
    """
    parent = os.environ.get("RSQL_MOTO_PARENT_PID")
    if not parent:
        return
    parent_pid = int(parent)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def main() -> None:
    exit_with_parent()
    if moto.__version__ != EXPECTED_MOTO:
        die(f"expected moto {EXPECTED_MOTO}; re-check the patches in this file, then bump it")
    patch_send_task_failure_cause()
    patch_task_token_lifecycle()
    patch_start_execution_default_name()
    patch_lifecycle_actions()
    server.main(sys.argv[1:])


if __name__ == "__main__":
    main()
