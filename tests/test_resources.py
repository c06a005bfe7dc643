"""What the run asks Ray for, against the cluster's nodes (no cluster needed: the nodes are given)."""
from qsae.config import CaptureConfig, TrainStageConfig
from qsae.distributed.resources import configured_node_types, infeasible, replica_request, trainer_request

TWO_GPU_NODES = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}]
HEAD = {"CPU": 4.0}


def test_a_request_fits_where_one_node_holds_each_bundle_and_the_cluster_all_of_them():
    assert infeasible(replica_request(CaptureConfig(cpus_per_actor=8, gpus_per_actor=1)), [HEAD, *TWO_GPU_NODES]) is None
    # four workers of one GPU each: two per node
    assert infeasible(trainer_request(TrainStageConfig(cpus_per_layer=8, gpus_per_layer=4, workers_per_layer=4)),
                      [HEAD, *TWO_GPU_NODES]) is None
    # a fraction of a GPU packs: three per GPU
    assert infeasible(trainer_request(TrainStageConfig(cpus_per_layer=1, gpus_per_layer=0.33)), TWO_GPU_NODES) is None


def test_what_no_node_holds_is_said_with_its_setting_and_the_nodes():
    reason = infeasible(replica_request(CaptureConfig(cpus_per_actor=4, gpus_per_actor=1)), [{"CPU": 2.0}])
    assert "capture.cpus_per_actor = 4, capture.gpus_per_actor = 1 asks for 4 CPU, 1 GPU" in reason
    assert "(its nodes: 2 CPU)" in reason
    # each bundle fits a node, but not all at once: six one-GPU workers on four GPUs
    many = trainer_request(TrainStageConfig(cpus_per_layer=6, gpus_per_layer=6, workers_per_layer=6))
    assert "asks for 6 x 1 CPU, 1 GPU" in infeasible(many, [HEAD, *TWO_GPU_NODES])
    # more CPUs in the cluster than a bundle needs, but on no one node
    assert infeasible(replica_request(CaptureConfig(cpus_per_actor=12)), TWO_GPU_NODES) is not None


def test_an_autoscaling_cluster_is_told_by_its_configured_node_types():
    assert configured_node_types(["ray.head.default", "gpu-workers"], ["aa", "bb"])  # launcher / KubeRay groups
    assert not configured_node_types(["node_aa", "node_bb"], ["aa", "bb"])  # `ray start` nodes, or a local Ray
    assert not configured_node_types([], [])
