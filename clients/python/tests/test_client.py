"""The Python client against a running Gatehouse (the repository's test command starts one and
sets GATEHOUSE_URL, GATEHOUSE_CA, GATEHOUSE_CERT, GATEHOUSE_KEY, and the other client's
GATEHOUSE_OTHER_CERT / GATEHOUSE_OTHER_KEY)."""

import os
import unittest
import uuid

from gatehouse_client import Client, GatehouseError


def client(cert: str = "GATEHOUSE_CERT", key: str = "GATEHOUSE_KEY") -> Client:
    env = os.environ
    return Client(env["GATEHOUSE_URL"], ca=env["GATEHOUSE_CA"], cert=env[cert], key=env[key])


class ClientTest(unittest.TestCase):
    def setUp(self) -> None:
        self.gh = client()

    def tearDown(self) -> None:
        self.gh.close()

    def test_submit_waits_for_the_result_and_the_record_reads_back(self) -> None:
        marker = f"ada-{uuid.uuid4().hex}"
        put = self.gh.submit("vault.put", {"record": {"name": marker}}, wait=10)
        self.assertEqual(put["status"], "succeeded", put)
        got = self.gh.submit("vault.get", {"token": put["result"]["token"]}, wait=10)
        self.assertEqual(got["result"]["record"], {"name": marker})

    def test_a_queued_job_is_followed_through_its_events_to_its_end(self) -> None:
        account = f"py-{uuid.uuid4().hex[:12]}"
        # Number 2 first: it waits for number 1, and says so in its stream.
        second = self.gh.submit("ledger.apply", {"account": account, "amount": 5}, sequence=(account, 2))
        self.assertIn(second["status"], ("queued", "waiting_for_sequence"), second)
        events = self.gh.events(second["id"])
        first_event = next(events)
        self.assertEqual(first_event.event, "state")
        self.gh.submit("ledger.apply", {"account": account, "amount": 7}, sequence=(account, 1), wait=10)
        states = [first_event.data["status"]] + [e.data["status"] for e in events if e.event == "state"]
        self.assertEqual(states[-1], "succeeded", states)
        self.assertIn("waiting_for_sequence", states)
        # Resumed after its first event: the transitions after it, not again.
        again = [e.data["status"] for e in self.gh.events(second["id"], last_event_id=first_event.id)]
        self.assertEqual(again, states[1:])
        final = self.gh.wait(second["id"], timeout=10)
        self.assertEqual(final["result"]["balance"], 12, final)

    def test_a_delayed_job_is_cancelled(self) -> None:
        later = self.gh.submit("vault.put", {"record": {"x": 1}}, delay_s=3600)
        self.assertEqual(later["status"], "scheduled", later)
        self.assertEqual(self.gh.cancel(later["id"])["status"], "cancelled")
        self.assertEqual(self.gh.status(later["id"])["status"], "cancelled")

    def test_an_idempotency_key_names_one_job(self) -> None:
        key = uuid.uuid4().hex
        a = self.gh.submit("vault.put", {"record": {"k": 1}}, idempotency_key=key)
        b = self.gh.submit("vault.put", {"record": {"k": 1}}, idempotency_key=key)
        self.assertEqual(a["id"], b["id"])

    def test_refusals_are_exceptions_with_the_problem_fields(self) -> None:
        with self.assertRaises(GatehouseError) as unknown:
            self.gh.submit("no.such.kind", {})
        e = unknown.exception
        self.assertEqual((e.status, e.type), (422, "unknown-kind"))
        self.assertEqual(e.errors[0]["path"], "/kind")
        with self.assertRaises(GatehouseError) as bad:
            self.gh.submit("vault.put", {"record": "not an object"})
        self.assertEqual((bad.exception.status, bad.exception.type), (422, "schema-violation"))
        with self.assertRaises(GatehouseError) as priority:
            self.gh.submit("vault.put", {"record": {}}, priority=12)
        self.assertEqual(priority.exception.type, "invalid-priority")

    def test_jobs_are_listed_newest_first_page_by_page(self) -> None:
        kind_marker = uuid.uuid4().hex
        ids = [self.gh.submit("vault.put", {"record": {"m": kind_marker, "n": n}}, wait=10)["id"] for n in range(3)]
        listed = [j["id"] for j in self.gh.iter_jobs(kind="vault.put", limit=2)]
        self.assertEqual([i for i in listed if i in ids], ids[::-1])
        with self.assertRaises(GatehouseError) as bad:
            self.gh.list_jobs(state="nope")
        self.assertEqual(bad.exception.type, "invalid-query")

    def test_another_clients_job_is_not_found(self) -> None:
        mine = self.gh.submit("vault.put", {"record": {"mine": 1}}, wait=10)
        with client("GATEHOUSE_OTHER_CERT", "GATEHOUSE_OTHER_KEY") as other:
            with self.assertRaises(GatehouseError) as theirs:
                other.status(mine["id"])
            self.assertEqual(theirs.exception.status, 404)
            with self.assertRaises(GatehouseError):
                next(other.events(mine["id"]))


if __name__ == "__main__":
    unittest.main()
