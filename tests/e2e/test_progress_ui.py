"""The operator UI in a real browser (Debian chromium driven by Playwright) against real
processes: following a background execution over WebSocket, SSE (WebSocket removed) and
long-poll (both removed), naming the transport and showing the final status; approving a
level-1 request by clicking as a second user; the runbook link of a level-2 request; the
refusal of a self-approval. Lists and decisions go over grpc-web. Screenshots of each state
are saved under ``test-artifacts/browser/``."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from opsconductor.lifecycle.storage.flags import update_flags

from .approvals_support import (
    RUNBOOK,
    deploy_plan,
    modify_plan,
    production_plan,
    wait_status,
    with_approvers,
)
from .conftest import Tenant, running_stack, token
from .plans import plan, probe_step
from .stack import Stack

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
NO_WEBSOCKET = "delete window.WebSocket"
NO_EVENTSOURCE = "delete window.EventSource"

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium missing: run make browser-tools"
)


@pytest.fixture(scope="module")
async def stack(e2e_dsn: str, e2e_pool: asyncpg.Pool, redis_url: str) -> AsyncIterator[Stack]:
    await update_flags(e2e_pool, {"max_approval_level": 3}, by="e2e")
    async with running_stack(
        e2e_dsn,
        redis_url,
        with_approvals=True,
        with_progress=True,
        OPSC_CONSUMER_POLL_INTERVAL_S="0.05",
    ) as running:
        yield running


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            await launched.close()


async def signed_in(
    browser: Browser, tenant: Tenant, actor: str, *, init_scripts: tuple[str, ...] = ()
) -> Page:
    page = await browser.new_page()
    for script in init_scripts:
        await page.add_init_script(script)
    await page.goto(f"http://127.0.0.1:{tenant.stack.http_port('progress')}/ui/")
    await page.get_by_label("Token").fill(token(actor, tenant.id))
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#whoami")).to_have_text(f"{actor} @ {tenant.id}")
    return page


async def shot(page: Page, name: str) -> None:
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def submit_background(tenant: Tenant, ledger: Path) -> str:
    async with tenant.client("alice") as client:
        submitted = await client.submit(
            plan(
                *(
                    probe_step(f"s{i}", ["web-1"], ledger, hold_s=0.4, estimate_ms=11_000)
                    for i in range(1, 4)
                ),
                sla="medium",
            ),
            tenant_id=tenant.id,
        )
    return submitted.execution_id


@pytest.mark.parametrize(
    ("transport", "scripts"),
    [
        ("websocket", ()),
        ("sse", (NO_WEBSOCKET,)),
        ("long-poll", (NO_WEBSOCKET, NO_EVENTSOURCE)),
    ],
)
async def test_page_follows_a_background_execution_to_its_end(
    browser: Browser, tenant: Tenant, ledger: Path, transport: str, scripts: tuple[str, ...]
) -> None:
    """The execution page picks WS → SSE → long-poll as the browser allows, names the one it
    uses, lists every event once in seq order and ends showing `succeeded` for every step."""
    execution_id = await submit_background(tenant, ledger)
    page = await signed_in(browser, tenant, "vera", init_scripts=scripts)
    await page.goto(page.url.split("#")[0] + f"#/executions/{execution_id}")
    await expect(page.locator("#transport")).to_have_text(transport)
    await shot(page, f"follow-{transport}-running")
    completed = page.locator('#events li[data-type="execution_completed"]')
    await expect(completed).to_have_count(1, timeout=30_000)
    await expect(page.locator("#exec-status")).to_have_text("succeeded")
    await expect(page.locator("#steps-rows tr")).to_have_count(3)
    for row in await page.locator("#steps-rows tr").all():
        await expect(row.locator("td").nth(2)).to_have_text("succeeded")
    seqs = [
        int(s)
        for s in await page.locator("#events li").evaluate_all("l => l.map(e => e.dataset.seq)")
    ]
    assert seqs == list(range(1, len(seqs) + 1))
    await expect(page.locator("#cancel")).to_be_disabled()
    await shot(page, f"follow-{transport}-done")
    await page.close()


async def test_executions_list_filters_by_status(
    browser: Browser, tenant: Tenant, ledger: Path
) -> None:
    """The list (over grpc-web) shows the tenant's executions; the status filter narrows it."""
    execution_id = await submit_background(tenant, ledger)
    async with tenant.client("alice") as client:
        await wait_status(client, await client.get(execution_id, tenant_id=tenant.id), "succeeded")
    page = await signed_in(browser, tenant, "vera")
    rows = page.locator("#executions-rows tr")
    await expect(rows.first).to_be_visible()
    await page.get_by_label("Status").select_option("running")
    await expect(page.locator("#executions-empty")).to_be_visible()
    await page.get_by_label("Status").select_option("succeeded")
    await expect(
        page.locator(f'#executions-rows a[href="#/executions/{execution_id}"]')
    ).to_be_visible()
    await shot(page, "executions-list")
    await page.close()


async def test_executions_list_pages_past_one_hundred(
    browser: Browser, tenant: Tenant, ledger: Path, e2e_pool: asyncpg.Pool
) -> None:
    """105 executions: the list shows the newest 100 and offers the older ones; "Show older
    executions" appends the other 5 (the next page, over grpc-web), each execution exactly
    once, newest first, and the button goes away at the end of the list."""
    in_flight = asyncio.Semaphore(10)  # the tenant's max_immediate quota refuses more
    async with tenant.client("alice") as client:

        async def submit(i: int) -> str:
            async with in_flight:
                done = await client.submit(
                    plan(probe_step("query", [f"srv-{i}"], ledger)), tenant_id=tenant.id
                )
                return done.execution_id

        submitted = set(await asyncio.gather(*(submit(i) for i in range(105))))
    newest_first = [
        str(r["id"])
        for r in await e2e_pool.fetch(
            "SELECT id FROM executions WHERE tenant_id = $1 ORDER BY created_at DESC, id DESC",
            tenant.id,
        )
    ]
    assert set(newest_first) == submitted
    page = await signed_in(browser, tenant, "vera")
    rows = page.locator("#executions-rows tr")
    more = page.get_by_role("button", name="Show older executions")
    await expect(rows).to_have_count(100)
    await expect(more).to_be_visible()
    await expect(page.locator("#executions-count")).to_have_text("100 shown, more exist")
    await shot(page, "executions-list-first-page")
    await more.click()
    await expect(rows).to_have_count(105)
    await expect(more).to_be_hidden()
    await expect(page.locator("#executions-count")).to_have_text("105 shown")
    hrefs = await page.locator("#executions-rows a").evaluate_all(
        "links => links.map(a => a.getAttribute('href'))"
    )
    assert hrefs == [f"#/executions/{e}" for e in newest_first]
    await shot(page, "executions-list-second-page")
    # A filter starts the list over from its first page.
    await page.get_by_label("Status").select_option("running")
    await expect(page.locator("#executions-empty")).to_be_visible()
    await expect(more).to_be_hidden()
    await page.close()


async def test_level_1_request_is_approved_by_clicking_as_a_second_user(
    browser: Browser, tenant: Tenant, ledger: Path
) -> None:
    """alice submits a level-1 plan; bob opens the approvals inbox, reviews it in the dialog
    (plan, level, requester, targets) and approves with a comment; the execution then runs."""
    await with_approvers(tenant)
    async with tenant.client("alice") as client:
        submitted = await client.submit(modify_plan(ledger, target="svc-ui"), tenant_id=tenant.id)
        assert submitted.status == "awaiting_approval"
        page = await signed_in(browser, tenant, "bob")
        await page.get_by_role("link", name="Approvals").click()
        row = page.locator(f'#approvals-rows tr[data-execution-id="{submitted.execution_id}"]')
        await row.get_by_role("button").click()
        dialog = page.get_by_role("dialog")
        await expect(dialog).to_be_visible()
        await expect(page.locator("#dlg-level")).to_have_text("1 — confirmation")
        await expect(page.locator("#dlg-requester")).to_have_text("alice")
        await expect(page.locator("#dlg-targets")).to_have_text("svc-ui")
        await expect(page.locator("#dlg-runbook-cell")).to_be_hidden()
        await page.get_by_label("Comment").fill("looks right")
        await shot(page, "approval-level-1-dialog")
        await page.get_by_role("button", name="Approve", exact=True).click()
        await expect(dialog).to_be_hidden()
        final = await wait_status(client, submitted, "succeeded")
    assert final.status == "succeeded"
    await page.goto(page.url.split("#")[0] + f"#/executions/{submitted.execution_id}")
    await expect(page.locator("#exec-status")).to_have_text("succeeded")
    await shot(page, "approval-level-1-ran")
    await page.close()


async def test_level_2_dialog_shows_the_runbook_link(
    browser: Browser, tenant: Tenant, ledger: Path
) -> None:
    """A deploy plan (level 2): the dialog names the level and links the plan's runbook."""
    await with_approvers(tenant)
    async with tenant.client("dave") as client:
        submitted = await client.submit(deploy_plan(ledger), tenant_id=tenant.id)
    assert submitted.status == "awaiting_approval"
    page = await signed_in(browser, tenant, "bob")
    await page.get_by_role("link", name="Approvals").click()
    row = page.locator(f'#approvals-rows tr[data-execution-id="{submitted.execution_id}"]')
    await row.get_by_role("button").click()
    await expect(page.locator("#dlg-level")).to_have_text("2 — plan review")
    link = page.locator("#dlg-runbook")
    await expect(link).to_be_visible()
    await expect(link).to_have_attribute("href", RUNBOOK)
    await shot(page, "approval-level-2-runbook")
    await page.get_by_role("button", name="Reject").click()
    await expect(page.get_by_role("dialog")).to_be_hidden()
    await page.close()


async def test_self_approval_shows_the_refusal(
    browser: Browser, tenant: Tenant, ledger: Path
) -> None:
    """ada (an admin, so an approver) cannot approve her own request: the dialog stays open and
    says so in words a person can act on."""
    async with tenant.client("ada") as client:
        submitted = await client.submit(modify_plan(ledger, target="svc-self"), tenant_id=tenant.id)
    page = await signed_in(browser, tenant, "ada")
    await page.get_by_role("link", name="Approvals").click()
    row = page.locator(f'#approvals-rows tr[data-execution-id="{submitted.execution_id}"]')
    await row.get_by_role("button").click()
    await page.get_by_role("button", name="Approve", exact=True).click()
    error = page.locator("#dlg-error")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("You cannot approve your own request")
    await expect(error).to_contain_text("another principal must decide")
    await shot(page, "approval-self-refused")
    await page.close()


async def test_level_3_steps_are_approved_one_by_one_in_the_dialog(
    browser: Browser, tenant: Tenant, ledger: Path
) -> None:
    """A level-3 production plan: bob approves the plan, then each step's request shows that
    step in the dialog with an "Approve step" button; after the last one the execution runs to
    its end. The runbook link is there for level 3 too."""
    await with_approvers(tenant)
    async with tenant.client("alice") as client:
        submitted = await client.submit(production_plan(ledger, steps=2), tenant_id=tenant.id)
        assert submitted.approval_level == 3
        page = await signed_in(browser, tenant, "bob")
        await page.get_by_role("link", name="Approvals").click()
        for expected_step in ("", "s1", "s2"):
            # The inbox refreshes itself: each step's request shows up once the step is next.
            row = page.locator(f'#approvals-rows tr[data-execution-id="{submitted.execution_id}"]')
            await expect(row.locator("td").nth(2)).to_have_text(
                expected_step or "whole plan", timeout=30_000
            )
            await row.get_by_role("button").click()
            await expect(page.locator("#dlg-level")).to_have_text("3 — step by step")
            await expect(page.locator("#dlg-runbook")).to_have_attribute("href", RUNBOOK)
            if expected_step:
                await expect(page.locator("#dlg-step")).to_have_text(expected_step)
                await shot(page, f"approval-level-3-{expected_step}")
                await page.get_by_role("button", name=f"Approve step {expected_step}").click()
            else:
                await page.get_by_role("button", name="Approve", exact=True).click()
            await expect(page.get_by_role("dialog")).to_be_hidden()
        final = await wait_status(client, submitted, "succeeded", "failed", "cancelled")
    assert final.status == "succeeded", (final.error_class, final.error_message)
    await page.close()
