"""The Python client against a running Gatehouse (the repository's test command starts one and
sets GATEHOUSE_URL, GATEHOUSE_CA, GATEHOUSE_CERT, GATEHOUSE_KEY, and the other client's
GATEHOUSE_OTHER_CERT / GATEHOUSE_OTHER_KEY)."""

import json
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

    def test_a_batch_is_accepted_whole_or_refused_whole(self) -> None:
        account = f"pyb-{uuid.uuid4().hex[:12]}"
        jobs = [
            {"kind": "ledger.apply", "payload": {"account": account, "amount": n}, "sequence": {"key": account, "number": n}}
            for n in (3, 2, 1)
        ]
        accepted = self.gh.submit_batch(jobs, on_complete={"kind": "vault.put", "payload": {"record": {"done": True}}})
        self.assertEqual(len(accepted["jobs"]), 3)
        done = self.gh.wait(accepted["on_complete"], timeout=20)
        self.assertEqual(done["status"], "succeeded", done)
        summary = self.gh.batch(accepted["id"])
        self.assertEqual((summary["status"], summary["counts"], summary["jobs"]), ("complete", {"succeeded": 3}, accepted["jobs"]))
        balance = self.gh.submit("ledger.balance", {"account": account}, wait=10)
        self.assertEqual(balance["result"]["balance"], 6, balance)
        with self.assertRaises(GatehouseError) as refused:
            self.gh.submit_batch([{"kind": "vault.put", "payload": {"record": {}}}, {"kind": "nope", "payload": {}}])
        self.assertEqual((refused.exception.status, refused.exception.type), (422, "batch-refused"))
        self.assertEqual(refused.exception.errors[0]["path"], "/jobs/1/kind")

    def test_a_workflow_runs_each_step_after_its_parents(self) -> None:
        sleep = lambda name, after, ms: {"name": name, "after": after, "kind": "test.sleep", "payload": {"ms": ms}}
        accepted = self.gh.submit_workflow(
            [sleep("extract", [], 50), sleep("a", ["extract"], 20), sleep("b", ["extract"], 10), sleep("merge", ["a", "b"], 1)]
        )
        merge = self.gh.wait(accepted["steps"]["merge"], timeout=20)
        self.assertEqual(merge["status"], "succeeded", merge)
        given = [(p["id"], p["result"]["slept_ms"]) for p in merge["result"]["parents"]]
        self.assertEqual(given, [(accepted["steps"]["a"], 20), (accepted["steps"]["b"], 10)])
        status = self.gh.workflow(accepted["id"])
        self.assertEqual((status["status"], status["counts"]), ("complete", {"succeeded": 4}), status)
        listed = self.gh.list_jobs(workflow=accepted["id"])
        self.assertEqual(sorted(j["id"] for j in listed["jobs"]), sorted(accepted["steps"].values()))
        with self.assertRaises(GatehouseError) as refused:
            self.gh.submit_workflow([sleep("a", ["b"], 1), sleep("b", ["a"], 1)])
        self.assertEqual((refused.exception.status, refused.exception.type), (422, "workflow-refused"))

    def test_another_clients_job_is_not_found(self) -> None:
        mine = self.gh.submit("vault.put", {"record": {"mine": 1}}, wait=10)
        with client("GATEHOUSE_OTHER_CERT", "GATEHOUSE_OTHER_KEY") as other:
            with self.assertRaises(GatehouseError) as theirs:
                other.status(mine["id"])
            self.assertEqual(theirs.exception.status, 404)
            with self.assertRaises(GatehouseError):
                next(other.events(mine["id"]))



class SealingTest(unittest.TestCase):
    """Fields sealed here, to a worker key the pinned operator key certified."""

    def setUp(self) -> None:
        env = os.environ
        self.gh = Client(
            env["GATEHOUSE_URL"],
            ca=env["GATEHOUSE_CA"],
            cert=env["GATEHOUSE_CERT"],
            key=env["GATEHOUSE_KEY"],
            operator_key=env["GATEHOUSE_OPERATOR_KEY"],
            catalog=env["GATEHOUSE_CATALOG"],
        )

    def tearDown(self) -> None:
        self.gh.close()

    def test_a_sealed_record_is_stored_and_read_back_and_never_sent_in_the_clear(self) -> None:
        marker = f"ssn-{uuid.uuid4().hex}"
        sent = []
        call = self.gh._call

        def spy(method, path, body=None, headers=None):  # type: ignore[no-untyped-def]
            sent.append(json.dumps(body))
            return call(method, path, body, headers)

        self.gh._call = spy  # type: ignore[method-assign]
        put = self.gh.submit("vault.put_sealed", {"record": {"ssn": marker}}, wait=10)
        self.assertEqual(put["status"], "succeeded", put)
        submitted = [b for b in sent if "vault.put_sealed" in b]
        self.assertEqual(len(submitted), 1)
        self.assertNotIn(marker, submitted[0])
        self.assertIn('"record": "ghs1.', submitted[0])
        got = self.gh.submit("vault.get", {"token": put["result"]["token"]}, wait=10)
        self.assertEqual(got["result"]["record"], {"ssn": marker})

    def test_a_field_that_must_be_sealed_is_refused_in_the_clear(self) -> None:
        with client() as plain:
            with self.assertRaises(GatehouseError) as refused:
                plain.submit("vault.put_sealed", {"record": {"ssn": "x"}})
        self.assertEqual((refused.exception.status, refused.exception.type), (422, "field-must-be-sealed"))
        self.assertEqual(refused.exception.errors[0]["path"], "/payload/record")

    def test_a_key_set_the_gatekeeper_swapped_is_refused(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from gatehouse_client import sealing

        operator = sealing.read_operator_key(os.environ["GATEHOUSE_OPERATOR_KEY"])
        served = self.gh.worker_keys()
        sealing.certified_key(served, operator)  # the genuine set passes
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        mine = X25519PrivateKey.generate().public_key().public_bytes(*raw)
        its_own = [{"id": sealing.key_id(mine), "public": sealing._b64(mine), "not_before_ms": 0, "not_after_ms": 2**53}]
        signed = json.dumps(its_own).encode()
        altered = dict(served, set=sealing._b64(signed))
        rogue = Ed25519PrivateKey.generate()
        recertified = {
            "set": sealing._b64(signed),
            "signed_by": sealing.key_id(rogue.public_key().public_bytes(*raw)),
            "signature": sealing._b64(rogue.sign(b"gatehouse worker key set v1\0" + signed)),
        }
        for swapped in (altered, recertified, dict(recertified, signed_by=served["signed_by"])):
            with self.assertRaises(sealing.SealingError):
                sealing.certified_key(swapped, operator)


if __name__ == "__main__":
    unittest.main()
