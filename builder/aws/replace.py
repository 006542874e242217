"""publish --force: replace an AMI of the same name. AMI names are unique per account and
region, so the old AMI is deregistered first, the new one registered, and the old one's
snapshots deleted once that is done (a re-run finishes what a stopped run left)."""

from __future__ import annotations

from botocore.exceptions import ClientError

from builder.aws.job import Publication, error_code, own_snapshot, say


def replace_image(job: Publication, old_image: str, old_snapshots: list[str]) -> str:
    """--force: AMI names are unique per account and region, so the old AMI is deregistered
    first (the new snapshots are uploaded by now: the name is free for a moment only), then
    the new one registered; the old one's snapshots are deleted once it is
    (finish_replacement, which a re-run also does if this run stops in between)."""
    ec2 = job.aws.client("ec2")
    job.record["replaced"] = {"image_id": old_image, "snapshot_ids": old_snapshots,
                              "done": False}
    job.save()
    say(f"--force: deregistering {old_image}, an AMI of the same name; its snapshots "
        f"({', '.join(old_snapshots) or 'none'}) go once the new AMI is registered")
    ec2.deregister_image(ImageId=old_image)
    return str(ec2.register_image(**job.request)["ImageId"])


def finish_replacement(job: Publication) -> None:
    replaced = job.record.get("replaced")
    if not replaced or replaced.get("done"):
        return
    ec2, deleted = job.aws.client("ec2"), []
    for snapshot_id in sorted(set(replaced["snapshot_ids"]) -
                              set(job.record["snapshot_ids"].values())):
        if not _made_for_this_name(job, snapshot_id):
            say(f"{snapshot_id} was not made by publish for {job.request['Name']}: kept")
            continue
        try:
            ec2.delete_snapshot(SnapshotId=snapshot_id)
            deleted.append(snapshot_id)
        except ClientError as exc:
            if error_code(exc) == "InvalidSnapshot.InUse":  # another AMI uses it too
                say(f"{snapshot_id} (of {replaced['image_id']}) is used by another AMI: kept")
            elif error_code(exc) != "InvalidSnapshot.NotFound":
                raise
    replaced["done"] = True
    job.save()
    say(f"replaced {replaced['image_id']} (deleted its snapshots: "
        f"{', '.join(deleted) or 'none'})")


def _made_for_this_name(job: Publication, snapshot_id: str) -> bool:
    """An old AMI's snapshot that --force may delete: this account's, and made by publish
    for an AMI of this name (its description)."""
    snapshot = own_snapshot(job, snapshot_id)
    return snapshot is not None and \
        str(snapshot.get("Description", "")).startswith(f"{job.request['Name']} /dev/")
