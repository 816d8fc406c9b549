// train_llama: trains a Llama-family model (Llama-2/3, Mistral, Qwen2, Gemma-2) from a model.bin on
// token shards, with the Mini-Sequence Transformer memory plan on the GPU, or with the fp32 CPU
// reference model on a machine without one. Reads top to bottom: options, the model to start
// from, the two backends behind one Trainer, checkpoints, sampling, the loop, main.
//
//   ./train_llama                     trains a small random-init Llama on the shipped corpus
//   ./train_llama --model m.bin --train 'data/x/train_*.bin' --val data/x/val.bin --seq-len 4096
//   ./train_llama --resume latest     continues the last checkpoint in --ckpt-dir, bit for bit
//   ./train_llama --plan-only --preset llama3-8b --seq-len 65536 --gpu-mem 80
//   ./train_llama --preset llama3-8b --synthetic-data --seq-len 8192 --batch 1 --steps 8 --bench
//   mpirun -np 2 ./train_llama --batch 16 ...            data parallel over 2 GPUs (8 rows each)
//   mpirun -np 8 ./train_llama --preset llama3-8b --seq-parallel --seq-len 1048576 ...
//                                                       sequence parallel: 131072 tokens per GPU
//   ./train_llama --model base.bin --lora-rank 16 --base-quant nf4 --train ...   (QLoRA-style)
//
// No kernels here: the GPU model lives in gpu_model.cu, the CPU model in cpu_model.h.
#include <float.h>
#include <glob.h>
#include <math.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "comm.h"
#include "cpu_model.h"
#include "cuda_utils.h"
#include "dataloader.h"
#include "dist.h"
#include "gpu_model.h"
#include "model_config.h"
#include "mst.h"
#include "tokenizer.h"
#include "utils.h"

// ----------------------------------------------------------------------------
// Options

typedef struct {
    const char *model, *tokenizer, *train, *val, *preset;
    int seq_len, batch, batch_given, grad_accum, steps;
    float lr, min_lr_frac, weight_decay, beta1, beta2, eps, clip;
    int warmup;
    const char *schedule;     // cosine | linear | constant
    const char *optimizer;    // adamw | adamw8bit
    const char *moments;      // bf16 | fp32 (GPU, adamw)
    int moments_given;
    int master_weights, mst_chunks, vocab_chunk, recompute, offload;  // mst_chunks, vocab_chunk: 0 = auto
    int host_layers;          // with offload: layers whose inputs live on the host; 0 = as few as fit
    int attn_head_groups;     // attention backward in 1, 2, 4 or 8 head-group calls; 0 = auto
    int attn_bwd_sliced;      // sliced attention backward: 0, 1 or MST_SLICED_AUTO
    int attn_kept_layers;     // with recompute: layers keeping their attention activations, or MST_KEPT_AUTO
    float gpu_mem_gib;        // 0: free device memory minus a margin
    float host_mem_gib;       // pinned host budget (plan and GPU runs); 0: mst_default_host_budget of this machine's memory
    int eval_every, eval_batches, sample_every, sample_tokens;
    const char *prompt;
    float temperature, top_p;
    const char *ckpt_dir, *resume, *log;
    const char *plan_json;    // write the memory plan and its step timeline as JSON (GPU path, --plan-only)
    const char *mem_trace;    // GPU path: device memory in use at each region boundary of every step, JSONL
    int ckpt_every, keep_last;
    uint64_t seed;
    int stop_after;           // 0: run to --steps; else stop (with a checkpoint) after this step
    int cpu, skip_nonfinite, plan_only;
    int synthetic;            // 1: uniformly random tokens instead of shards (no tokenizer)
    int bench;                // 1: print a BENCH {json} line after the run
    int profile;              // 1: GPU time by region of the steps after the first (GPU path)
    int checkpoints;          // 0: write none (synthetic data without --ckpt-every / --stop-after)
    int eval_given, sample_given, ckpt_given, lora_given;  // the flags were on the command line
    LoraConfig lora;          // rank 0: full fine-tuning; else adapters on a frozen (optionally quantized) base
    int overlap_optimizer;    // 1: optimizer-in-backward's AdamW on a side stream (one GPU; several always)
    int seq_parallel;         // several GPUs: split every row's tokens (Ulysses) instead of the rows
    int gpus;                 // --plan-only: plan for this many GPUs; training: must match the launcher (0: any)
    const char *dist_dir, *dist_id;
    float dist_timeout;       // seconds a rank waits for the others before it stops with an error
    const char *dump_grads;   // write step 1's gradient (summed over the ranks) here
} Options;

#define SYNTHETIC_DEFAULT_VOCAB 8192  // vocab of the default model with --synthetic-data (no tokenizer)
#define BENCH_WARMUP 2                // steps --bench leaves out of the median

static Options options_default(void) {
    Options o;
    memset(&o, 0, sizeof(o));
    o.tokenizer = "data/default/tokenizer.bin";
    o.train = "data/default/train_*.bin";
    o.val = "data/default/val.bin";
    o.seq_len = 128;
    o.batch = 8;
    o.grad_accum = 1;
    o.steps = 100;
    o.lr = 3e-3f;
    o.min_lr_frac = 0.1f;
    o.warmup = 5;
    o.schedule = "cosine";
    o.weight_decay = 0.1f;
    o.beta1 = 0.9f;
    o.beta2 = 0.95f;
    o.eps = 1e-8f;
    o.clip = 1.0f;
    o.optimizer = "adamw";
    o.moments = "bf16";
    o.recompute = MST_RECOMPUTE_AUTO;
    o.attn_bwd_sliced = MST_SLICED_AUTO;
    o.attn_kept_layers = MST_KEPT_AUTO;
    o.eval_every = 25;
    o.eval_batches = 4;
    o.sample_every = 50;
    o.sample_tokens = 48;
    o.prompt = "And God said";
    o.temperature = 0.8f;
    o.top_p = 0.9f;
    o.ckpt_dir = "checkpoints";
    o.ckpt_every = 50;
    o.keep_last = 2;
    o.seed = 1337;
    o.checkpoints = 1;
    o.dist_timeout = 1800.0f;
    o.lora.targets = LORA_ALL_TARGETS;
    return o;
}

static void usage(FILE *f) {
    Options d = options_default();
    fprintf(f,
            "usage: train_llama [options]\n"
            "model and data\n"
            "  --model PATH          model.bin to train (default: none = a small random-init Llama:\n"
            "                        vocab of the tokenizer, d 256, 4 layers, 8 heads, 4 kv heads, d_ff 688)\n"
            "  --tokenizer PATH      tokenizer.bin (default %s)\n"
            "  --train GLOB          training shards (default %s)\n"
            "  --val PATH            validation shard(s) (default %s)\n"
            "  --seq-len S           tokens per row (default %d)\n"
            "  --batch B             rows per micro-batch (default %d; --plan-only: 1)\n"
            "  --grad-accum K        micro-batches per optimizer step (default %d)\n"
            "  --steps N             optimizer steps (default %d)\n"
            "optimizer\n"
            "  --optimizer NAME      adamw | adamw8bit: AdamW with 8-bit block-wise moments, on the GPU and\n"
            "                        the CPU path; full-parameter only, not with --lora-rank (default %s)\n"
            "  --lr LR               peak learning rate (default %g)\n"
            "  --min-lr-frac F       final lr = F * lr (default %g)\n"
            "  --warmup N            linear warmup steps (default %d)\n"
            "  --schedule NAME       cosine | linear | constant (default %s)\n"
            "  --weight-decay WD     AdamW decay of matrices (default %g)\n"
            "  --beta1 B1 --beta2 B2 --eps E   AdamW (defaults %g, %g, %g)\n"
            "  --clip C              global gradient-norm clip, 0 = none (default %g)\n"
            "GPU memory (Mini-Sequence Transformer)\n"
            "  --moments bf16|fp32   AdamW moment type (--optimizer adamw; default %s)\n"
            "  --master-weights      keep fp32 master weights (default off)\n"
            "  --overlap-optimizer   one GPU, --grad-accum 1: run each layer's AdamW on a side stream while the\n"
            "                        backward of the layer below goes on (one more fp32 layer-gradient buffer; the\n"
            "                        same numbers; several GPUs always do so)\n"
            "  --mst auto|M          token chunks of the MLP and LM head (default auto)\n"
            "  --vocab-chunk auto|N  LM-head columns per tile (default auto)\n"
            "  --recompute 0|1|auto  keep only layer inputs and recompute each layer in backward; default auto:\n"
            "                        off when the standard transformer (M 1, one vocabulary tile) fits, else on\n"
            "  --keep-attn auto|K    with recompute on: the last K layers keep their attention activations, so\n"
            "                        the backward skips recomputing their attention part (faster, more memory);\n"
            "                        default auto: as many layers as the memory left after everything else allows\n"
            "  --offload 0|1         layer inputs may live in pinned host memory (default %d)\n"
            "  --host-layers N       with --offload 1: the first N layers keep their inputs on the host\n"
            "                        (default: as few as fit)\n"
            "  --attn-head-groups auto|G  attention backward in G calls over Hq/G heads each (1, 2, 4, 8;\n"
            "                        divides cuDNN's fp32 workspace by about G; default auto: more than 1 only\n"
            "                        when one call does not fit)\n"
            "  --attn-bwd-sliced 0|1|auto  attention backward group by group keeping only one head group's\n"
            "                        gradients (no full dq|dk|dv buffer; needs --recompute 1, cuDNN attention,\n"
            "                        no LoRA; groups as --attn-head-groups, 2 or more); default auto: only\n"
            "                        when nothing else fits\n"
            "  --gpu-mem GiB         device budget (default: free memory at start minus 0.5 GiB)\n"
            "  --host-mem GiB        pinned host budget of offloaded layer inputs, here or (--plan-only) on the\n"
            "                        machine planned for (default: this machine's memory less 16 GiB, at least\n"
            "                        3/4 of it; 109 on the 125 GiB H100 device machine)\n"
            "  --cpu                 train on the CPU reference path even with a GPU\n"
            "LoRA (the base stays frozen; checkpoints hold the adapters: lora_<step>.bin + state_<step>.bin)\n"
            "  --lora-rank R         train rank-R adapters instead of every weight (default 0: no LoRA)\n"
            "  --lora-alpha A        adapter scale alpha / R (default: R, scale 1)\n"
            "  --lora-targets LIST   comma-separated of q,k,v,o,gate,up,down, or all (default all)\n"
            "  --base-quant Q        none | int8 | nf4: store the frozen base projections quantized, blocks of\n"
            "                        64 with an fp32 absmax each (GPU: dequantized per layer; needs --lora-rank)\n"
            "evaluation and sampling\n"
            "  --eval-every N        evaluate every N steps, 0 = only at the end (default %d)\n"
            "  --eval-batches N      validation batches per evaluation (default %d)\n"
            "  --sample-every N      sample every N steps, 0 = only at the end (default %d)\n"
            "  --sample-tokens N     tokens per sample, 0 = no sampling (default %d)\n"
            "  --prompt TEXT         sampling prompt (default \"%s\")\n"
            "  --temperature T       0 = greedy (default %g)\n"
            "  --top-p P             nucleus sampling (default %g)\n"
            "checkpoints and logs\n"
            "  --ckpt-dir DIR        checkpoint directory (default %s)\n"
            "  --ckpt-every N        checkpoint every N steps, 0 = only at the end (default %d)\n"
            "  --keep-last K         checkpoints kept (default %d)\n"
            "  --resume latest|PATH  continue from the newest checkpoint in --ckpt-dir, or a state_<step>.bin\n"
            "  --stop-after N        stop after step N with a checkpoint (splits a run: the lr schedule still spans --steps)\n"
            "  --seed N              init, data order and sampling seed (default %llu)\n"
            "  --log FILE            JSONL log, one object per step / evaluation\n"
            "  --skip-nonfinite      skip a step with a NaN/Inf loss or grad norm instead of stopping (CPU path)\n"
            "planning\n"
            "  --plan-only           print the memory plan (no GPU, no weights) and exit 0 if it fits, 1 if not;\n"
            "                        uses --preset or --model, --seq-len, --batch, --gpu-mem and the flags above\n"
            "  --preset NAME         llama3-8b | llama2-7b | mistral-7b | qwen2-7b | gemma2-9b: with --plan-only, plan\n"
            "                        that config; else train it from a random init (std 0.02; GPU only)\n"
            "  --plan-json FILE      write the memory plan as JSON: entries, totals by category and the bytes live\n"
            "                        in each phase of one step (for scripts/plot_memory.py); --plan-only or GPU path\n"
            "benchmarks\n"
            "  --synthetic-data      uniformly random tokens of the model's vocabulary (seeded) instead of shards;\n"
            "                        no tokenizer (the default model then has vocab %d), no sampling, and no\n"
            "                        evaluation or checkpoints unless --eval-every/--eval-batches or\n"
            "                        --ckpt-every/--stop-after ask for them\n"
            "  --bench               after the run print one line 'BENCH {json}': settings, median step ms over\n"
            "                        the steps after the first %d (at least the last step; with --steps 1 that one\n"
            "                        step, its warm-up included), tok/s, TFLOP/s, MFU, peak and planned memory\n"
            "  --profile             GPU path: after the run, a table of GPU time per step by region (attention,\n"
            "                        MLP, LM head, optimizer, ...), the mean over the steps after the first\n"
            "  --mem-trace FILE      GPU path: at each region boundary of every step, wait for the GPU and write\n"
            "                        the device memory in use (cudaMemGetInfo) as a JSON line (slows the steps;\n"
            "                        scripts/plot_memory.py timeline --trace draws it over the planned timeline)\n"
            "several GPUs (one process each: mpirun -np N ./train_llama ..., or RANK/WORLD_SIZE/LOCAL_RANK set)\n"
            "                        data parallel by default: --batch is the global batch, split over the GPUs;\n"
            "                        gradients summed, optimizer state sharded (ZeRO), weights exchanged\n"
            "  --seq-parallel        split every row's --seq-len tokens over the GPUs instead (Ulysses attention)\n"
            "  --gpus N              --plan-only: plan for N GPUs; training: refuse to start unless N processes run\n"
            "  --dist-dir DIR        rendezvous directory (default /tmp/mst-train-<uid>-<launcher's job id>)\n"
            "  --dist-id ID          names the rendezvous directory when the launcher gives no job id\n"
            "  --dist-timeout S      seconds a rank waits for the others before stopping with an error (default %g)\n"
            "  --dump-grads PATH     write step 1's gradient (fp32, summed over the GPUs) to PATH; needs --grad-accum >= 2\n"
            "  --help                this text\n",
            d.tokenizer, d.train, d.val, d.seq_len, d.batch, d.grad_accum, d.steps, d.optimizer, d.lr, d.min_lr_frac, d.warmup,
            d.schedule, d.weight_decay, d.beta1, d.beta2, d.eps, d.clip, d.moments, d.offload,
            d.eval_every, d.eval_batches, d.sample_every, d.sample_tokens, d.prompt, d.temperature, d.top_p,
            d.ckpt_dir, d.ckpt_every, d.keep_last, (unsigned long long)d.seed, SYNTHETIC_DEFAULT_VOCAB, BENCH_WARMUP,
            d.dist_timeout);
}

static long long parse_int(const char *flag, const char *s, long long lo, long long hi) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0') die("%s: '%s' is not an integer", flag, s);
    if (v < lo || v > hi) die("%s: %lld is out of range [%lld, %lld]", flag, v, lo, hi);
    return v;
}

static float parse_float(const char *flag, const char *s, float lo, float hi) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno != 0 || end == s || *end != '\0' || !isfinite(v)) die("%s: '%s' is not a number", flag, s);
    if (v < lo || v > hi) die("%s: %g is out of range [%g, %g]", flag, v, lo, hi);
    return v;
}

// "auto" -> 0, else an integer >= 1.
// "auto" -> auto_value, else an integer in [lo, hi].
static int parse_int_or_auto(const char *flag, const char *s, int auto_value, long long lo, long long hi) {
    return strcmp(s, "auto") == 0 ? auto_value : (int)parse_int(flag, s, lo, hi);
}

static int parse_base_quant(const char *flag, const char *s) {
    for (int q = 0; q < BASE_QUANT_COUNT; q++)
        if (strcmp(s, base_quant_name(q)) == 0) return q;
    die("%s: '%s' is not one of none, int8, nf4", flag, s);
    return 0;
}

static const char *parse_choice(const char *flag, const char *s, const char *a, const char *b, const char *c) {
    if (strcmp(s, a) == 0 || strcmp(s, b) == 0 || (c && strcmp(s, c) == 0)) return s;
    die("%s: '%s' is not one of %s, %s%s%s", flag, s, a, b, c ? ", " : "", c ? c : "");
    return NULL;
}

// Options that take a value.
static const char *const VALUE_FLAGS[] = {
    "--model", "--tokenizer", "--train", "--val", "--preset", "--seq-len", "--batch", "--grad-accum", "--steps", "--lr",
    "--min-lr-frac", "--warmup", "--schedule", "--weight-decay", "--beta1", "--beta2", "--eps", "--clip", "--moments", "--optimizer",
    "--mst", "--vocab-chunk", "--recompute", "--offload", "--gpu-mem", "--host-mem", "--host-layers", "--eval-every",
    "--eval-batches", "--sample-every", "--sample-tokens", "--prompt", "--temperature", "--top-p", "--ckpt-dir",
    "--ckpt-every", "--keep-last", "--resume", "--stop-after", "--seed", "--log", "--plan-json", "--mem-trace",
    "--lora-rank", "--lora-alpha", "--lora-targets", "--base-quant", "--attn-head-groups", "--attn-bwd-sliced", "--keep-attn", "--gpus", "--dist-dir", "--dist-id",
    "--dist-timeout", "--dump-grads"};

static int is_value_flag(const char *a) {
    for (size_t i = 0; i < sizeof(VALUE_FLAGS) / sizeof(VALUE_FLAGS[0]); i++)
        if (strcmp(a, VALUE_FLAGS[i]) == 0) return 1;
    return 0;
}

static Options options_parse(int argc, char **argv) {
    Options o = options_default();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) { usage(stdout); exit(0); }
        if (strcmp(a, "--master-weights") == 0) { o.master_weights = 1; continue; }
        if (strcmp(a, "--overlap-optimizer") == 0) { o.overlap_optimizer = 1; continue; }
        if (strcmp(a, "--cpu") == 0) { o.cpu = 1; continue; }
        if (strcmp(a, "--skip-nonfinite") == 0) { o.skip_nonfinite = 1; continue; }
        if (strcmp(a, "--plan-only") == 0) { o.plan_only = 1; continue; }
        if (strcmp(a, "--synthetic-data") == 0) { o.synthetic = 1; continue; }
        if (strcmp(a, "--bench") == 0) { o.bench = 1; continue; }
        if (strcmp(a, "--profile") == 0) { o.profile = 1; continue; }
        if (strcmp(a, "--seq-parallel") == 0) { o.seq_parallel = 1; continue; }
        if (strncmp(a, "--", 2) != 0) die("unexpected argument '%s' (see --help)", a);
        if (!is_value_flag(a)) die("unknown option '%s' (see --help)", a);
        if (i + 1 >= argc) die("%s needs a value (see --help)", a);
        const char *v = argv[++i];
        if (strcmp(a, "--model") == 0) o.model = v;
        else if (strcmp(a, "--tokenizer") == 0) o.tokenizer = v;
        else if (strcmp(a, "--train") == 0) o.train = v;
        else if (strcmp(a, "--val") == 0) o.val = v;
        else if (strcmp(a, "--preset") == 0) o.preset = v;
        else if (strcmp(a, "--seq-len") == 0) o.seq_len = (int)parse_int(a, v, 2, 1 << 24);
        else if (strcmp(a, "--batch") == 0) { o.batch = (int)parse_int(a, v, 1, 1 << 20); o.batch_given = 1; }
        else if (strcmp(a, "--grad-accum") == 0) o.grad_accum = (int)parse_int(a, v, 1, 1 << 20);
        else if (strcmp(a, "--steps") == 0) o.steps = (int)parse_int(a, v, 0, INT32_MAX);
        else if (strcmp(a, "--lr") == 0) o.lr = parse_float(a, v, 0.0f, 10.0f);
        else if (strcmp(a, "--min-lr-frac") == 0) o.min_lr_frac = parse_float(a, v, 0.0f, 1.0f);
        else if (strcmp(a, "--warmup") == 0) o.warmup = (int)parse_int(a, v, 0, INT32_MAX);
        else if (strcmp(a, "--schedule") == 0) o.schedule = parse_choice(a, v, "cosine", "linear", "constant");
        else if (strcmp(a, "--weight-decay") == 0) o.weight_decay = parse_float(a, v, 0.0f, 10.0f);
        else if (strcmp(a, "--beta1") == 0) o.beta1 = parse_float(a, v, 0.0f, 0.999999f);
        else if (strcmp(a, "--beta2") == 0) o.beta2 = parse_float(a, v, 0.0f, 0.999999f);
        else if (strcmp(a, "--eps") == 0) o.eps = parse_float(a, v, 1e-30f, 1.0f);
        else if (strcmp(a, "--clip") == 0) o.clip = parse_float(a, v, 0.0f, FLT_MAX);
        else if (strcmp(a, "--moments") == 0) { o.moments = parse_choice(a, v, "bf16", "fp32", NULL); o.moments_given = 1; }
        else if (strcmp(a, "--optimizer") == 0) o.optimizer = parse_choice(a, v, "adamw", "adamw8bit", NULL);
        else if (strcmp(a, "--mst") == 0) o.mst_chunks = parse_int_or_auto(a, v, 0, 1, INT32_MAX);
        else if (strcmp(a, "--vocab-chunk") == 0) o.vocab_chunk = parse_int_or_auto(a, v, 0, 1, INT32_MAX);
        else if (strcmp(a, "--recompute") == 0) o.recompute = parse_int_or_auto(a, v, MST_RECOMPUTE_AUTO, 0, 1);
        else if (strcmp(a, "--offload") == 0) o.offload = (int)parse_int(a, v, 0, 1);
        else if (strcmp(a, "--host-layers") == 0) o.host_layers = (int)parse_int(a, v, 1, INT32_MAX);
        else if (strcmp(a, "--attn-head-groups") == 0) o.attn_head_groups = parse_int_or_auto(a, v, 0, 1, INT32_MAX);
        else if (strcmp(a, "--attn-bwd-sliced") == 0)
            o.attn_bwd_sliced = parse_int_or_auto(a, v, MST_SLICED_AUTO, 0, 1);
        else if (strcmp(a, "--keep-attn") == 0)
            o.attn_kept_layers = parse_int_or_auto(a, v, MST_KEPT_AUTO, 0, 1 << 20);
        else if (strcmp(a, "--gpu-mem") == 0) o.gpu_mem_gib = parse_float(a, v, 0.0f, 1e6f);
        else if (strcmp(a, "--host-mem") == 0) o.host_mem_gib = parse_float(a, v, 1.0f, 1e6f);
        else if (strcmp(a, "--eval-every") == 0) { o.eval_every = (int)parse_int(a, v, 0, INT32_MAX); o.eval_given = 1; }
        else if (strcmp(a, "--eval-batches") == 0) { o.eval_batches = (int)parse_int(a, v, 0, 1 << 20); o.eval_given = 1; }
        else if (strcmp(a, "--sample-every") == 0) { o.sample_every = (int)parse_int(a, v, 0, INT32_MAX); o.sample_given = 1; }
        else if (strcmp(a, "--sample-tokens") == 0) { o.sample_tokens = (int)parse_int(a, v, 0, 1 << 20); o.sample_given = 1; }
        else if (strcmp(a, "--prompt") == 0) o.prompt = v;
        else if (strcmp(a, "--temperature") == 0) o.temperature = parse_float(a, v, 0.0f, 100.0f);
        else if (strcmp(a, "--top-p") == 0) o.top_p = parse_float(a, v, 1e-6f, 1.0f);
        else if (strcmp(a, "--ckpt-dir") == 0) o.ckpt_dir = v;
        else if (strcmp(a, "--ckpt-every") == 0) { o.ckpt_every = (int)parse_int(a, v, 0, INT32_MAX); o.ckpt_given = 1; }
        else if (strcmp(a, "--keep-last") == 0) o.keep_last = (int)parse_int(a, v, 1, 1 << 20);
        else if (strcmp(a, "--resume") == 0) o.resume = v;
        else if (strcmp(a, "--stop-after") == 0) { o.stop_after = (int)parse_int(a, v, 1, INT32_MAX); o.ckpt_given = 1; }
        else if (strcmp(a, "--seed") == 0) o.seed = (uint64_t)parse_int(a, v, 0, INT64_MAX);
        else if (strcmp(a, "--log") == 0) o.log = v;
        else if (strcmp(a, "--lora-rank") == 0) o.lora.rank = (int)parse_int(a, v, 0, 65536);
        else if (strcmp(a, "--lora-alpha") == 0) { o.lora.alpha = parse_float(a, v, 1e-6f, 1e6f); o.lora_given = 1; }
        else if (strcmp(a, "--lora-targets") == 0) {
            char msg[256];
            const char *err = lora_parse_targets(v, &o.lora.targets, msg, sizeof(msg));
            if (err) die("--lora-targets: %s", err);
            o.lora_given = 1;
        }
        else if (strcmp(a, "--base-quant") == 0) o.lora.base_quant = parse_base_quant(a, v);
        else if (strcmp(a, "--plan-json") == 0) o.plan_json = v;
        else if (strcmp(a, "--mem-trace") == 0) o.mem_trace = v;
        else if (strcmp(a, "--gpus") == 0) o.gpus = (int)parse_int(a, v, 1, 4096);
        else if (strcmp(a, "--dist-dir") == 0) o.dist_dir = v;
        else if (strcmp(a, "--dist-id") == 0) o.dist_id = v;
        else if (strcmp(a, "--dist-timeout") == 0) o.dist_timeout = parse_float(a, v, 1.0f, 1e7f);
        else if (strcmp(a, "--dump-grads") == 0) o.dump_grads = v;
        else die("internal: option '%s' has no handler", a);
    }
    if (o.preset && (o.model || o.resume)) die("--preset NAME builds a random-init model: it does not go with --model or --resume");
    if (o.synthetic) {
        if (o.sample_given && o.sample_tokens > 0) die("--synthetic-data runs without a tokenizer: it cannot sample (drop --sample-tokens/--sample-every)");
        o.sample_tokens = 0;
        if (!o.eval_given) { o.eval_every = 0; o.eval_batches = 0; }
        o.checkpoints = o.ckpt_given;
    }
    if (strcmp(o.optimizer, "adamw8bit") == 0 && o.moments_given)
        die("--moments sets the moment type of --optimizer adamw; adamw8bit keeps 8-bit moments (drop --moments)");
    if (o.host_layers > 0 && o.offload == 0) die("--host-layers N needs --offload 1");
    if (o.recompute == 0 && o.offload == 1) die("--offload 1 needs --recompute 1 (only recomputed layers can keep their inputs on the host)");
    if (o.recompute == 0 && o.attn_kept_layers > 0)
        die("--keep-attn %d needs --recompute 1 (without recompute every layer keeps its activations)", o.attn_kept_layers);
    if (o.dump_grads && o.grad_accum < 2) die("--dump-grads needs --grad-accum >= 2 (optimizer-in-backward never holds the whole gradient)");
    if (o.dump_grads && o.lora.rank > 0) die("--dump-grads writes the full model's gradient: it does not go with --lora-rank");
    if (o.overlap_optimizer && o.grad_accum > 1) die("--overlap-optimizer overlaps optimizer-in-backward: it needs --grad-accum 1");
    if (o.overlap_optimizer && o.lora.rank > 0)
        die("--overlap-optimizer overlaps the full model's per-layer AdamW: LoRA's adapter updates are tiny, drop it");
    if (o.lora.rank > 0 && strcmp(o.optimizer, "adamw8bit") == 0)
        die("--optimizer adamw8bit quantizes the moments of full-parameter training; LoRA adapters keep AdamW moments "
            "(bf16 or fp32, small beside the base): drop --optimizer adamw8bit");
    if (o.lora.rank == 0 && o.lora_given) die("--lora-alpha and --lora-targets shape LoRA adapters: they need --lora-rank R");
    if (o.lora.rank > 0 && o.lora.alpha == 0.0f) o.lora.alpha = (float)o.lora.rank;
    char msg[256];
    if (lora_config_check(&o.lora, msg, sizeof(msg))) die("%s", msg);
    if (o.lora.rank > 0 && !o.model && !o.preset)
        die("--lora-rank trains adapters on a frozen base: give the base with --model PATH (or --preset for benchmarks)");
    return o;
}

// ----------------------------------------------------------------------------
// The trainer's RNG (xorshift64*): random init and sampling. Its state is saved in checkpoints.

static uint64_t rng_next(uint64_t *s) {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

static float rng_uniform(uint64_t *s) { return (float)((rng_next(s) >> 40) * (1.0 / 16777216.0)); }

static uint64_t rng_seed(uint64_t seed) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return z ? z : 1;
}

// A standard normal sample (Box-Muller).
static float rng_normal(uint64_t *s) {
    float u1 = rng_uniform(s), u2 = rng_uniform(s);
    if (u1 < 1e-7f) u1 = 1e-7f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

// ----------------------------------------------------------------------------
// The model to start from: a model.bin, or the default small Llama with a seeded random init.

static void default_config(ModelConfig *c, int vocab) {
    preset_base(c, FAMILY_LLAMA, vocab, 256, 4, 8, 4, 32, 688, 2048, 1e-5f, 10000.0f);
}

struct InitCtx { uint16_t *params; uint64_t *rng; float out_scale; };

// Norm weights 1; every matrix N(0, 0.02), output projections (wo, w_down) scaled by 1/sqrt(2L).
static void init_tensor(const char *name, size_t offset, size_t rows, size_t cols, void *ctx) {
    InitCtx *x = (InitCtx *)ctx;
    size_t n = rows * cols;
    int is_out = strstr(name, ".wo") != NULL || strstr(name, ".w_down") != NULL;
    float std = 0.02f * (is_out ? x->out_scale : 1.0f);
    for (size_t i = 0; i < n; i++)
        x->params[offset + i] = float_to_bf16_bits(rows == 1 ? 1.0f : std * rng_normal(x->rng));
}

static uint16_t *random_init_model(ModelConfig *c, ParamLayout *layout, int vocab, uint64_t seed) {
    default_config(c, vocab);
    param_layout_init(layout, c);
    uint16_t *params = (uint16_t *)mallocCheck(layout->total * sizeof(uint16_t));
    uint64_t rng = rng_seed(seed ^ 0x1A17ULL);
    InitCtx ctx = {params, &rng, 1.0f / sqrtf(2.0f * c->n_layers)};
    param_layout_visit(layout, c, init_tensor, &ctx);
    return params;
}

// ----------------------------------------------------------------------------
// Batches: token shards through the DataLoader, or --synthetic-data: rows of uniformly random
// tokens, batch k drawn from its own seed (seed, k), so a position is just k.

typedef struct {
    int synthetic;
    DataLoader dl;                 // shards
    int B, S, V;                   // synthetic
    uint64_t seed;
    int64_t next;                  // synthetic: index of the next batch
    int *synth_inputs, *synth_targets;
    const int *inputs, *targets;   // (B, S) of the last batch_next
} Batches;

static void batches_init(Batches *b, const Options *o, const char *glob_pattern, int vocab, int shuffle, uint64_t seed) {
    memset(b, 0, sizeof(*b));
    b->synthetic = o->synthetic;
    if (!b->synthetic) {
        dataloader_init(&b->dl, glob_pattern, o->batch, o->seq_len, vocab, shuffle, seed);
        return;
    }
    b->B = o->batch;
    b->S = o->seq_len;
    b->V = vocab;
    b->seed = seed;
    b->synth_inputs = (int *)mallocCheck((size_t)b->B * b->S * sizeof(int));
    b->synth_targets = (int *)mallocCheck((size_t)b->B * b->S * sizeof(int));
}

// Next batch into b->inputs / b->targets. Synthetic rows: S + 1 random tokens, targets shifted by one.
static void batches_next(Batches *b) {
    if (!b->synthetic) {
        dataloader_next_batch(&b->dl);
        b->inputs = b->dl.inputs;
        b->targets = b->dl.targets;
        return;
    }
    uint64_t rng = rng_seed(b->seed ^ 0x5E7D0000ULL ^ ((uint64_t)b->next << 20));
    for (int r = 0; r < b->B; r++) {
        int prev = (int)(rng_next(&rng) % (uint64_t)b->V);
        for (int i = 0; i < b->S; i++) {
            int tok = (int)(rng_next(&rng) % (uint64_t)b->V);
            b->synth_inputs[(size_t)r * b->S + i] = prev;
            b->synth_targets[(size_t)r * b->S + i] = tok;
            prev = tok;
        }
    }
    b->next++;
    b->inputs = b->synth_inputs;
    b->targets = b->synth_targets;
}

static void batches_reset(Batches *b) {
    if (b->synthetic) b->next = 0;
    else dataloader_reset(&b->dl);
}

// Synthetic positions: cursor = batch index, n_shards = 0 (a shard position always has n_shards >= 1).
static DataPosition batches_get_position(const Batches *b) {
    if (!b->synthetic) return dataloader_get_position(&b->dl);
    DataPosition p = {0, 0, b->next, b->S, 0};
    return p;
}

static void batches_set_position(Batches *b, DataPosition p) {
    if ((p.n_shards == 0) != (b->synthetic != 0))
        die("the checkpoint was taken with %s, this run uses %s: resume with the same data",
            p.n_shards == 0 ? "--synthetic-data" : "token shards", b->synthetic ? "--synthetic-data" : "token shards");
    if (!b->synthetic) {
        dataloader_set_position(&b->dl, p);
        return;
    }
    if (p.seq_len != b->S) die("the checkpoint's synthetic data had --seq-len %lld, this run %d", (long long)p.seq_len, b->S);
    b->next = p.cursor;
}

static void batches_free(Batches *b) {
    if (!b->synthetic) {
        dataloader_free(&b->dl);
        return;
    }
    free(b->synth_inputs);
    free(b->synth_targets);
}

// ----------------------------------------------------------------------------
// The two backends behind one Trainer: a switch on the backend in each call.

enum { BACKEND_CPU = 0, BACKEND_GPU = 1 };

typedef struct {
    int backend;
    ModelConfig c;
    ParamLayout layout;
    int B, S, grad_accum;     // the global batch (over every GPU)
    LoraConfig lora;    // rank 0: every weight trains; else only the adapters (lora.h)
    size_t n_train;     // trainable values: layout.total, or the adapters' count
    int adam8;          // --optimizer adamw8bit (full-parameter training only)
    // several GPUs (comm NULL: one): each rank's part of a batch is B_local rows of S_local tokens
    Comm *comm;
    int seq_parallel, B_local, S_local;
    int *part_inputs, *part_targets;  // (B_local, S_local) this rank's part of the last batch
    // CPU: fp32 params are the master weights; fp32 AdamW moments, or 8-bit ones (adam8)
    CpuModel cpu;
    float *mom1, *mom2;
    Adam8Layout a8;
    Adam8State q;
    Adam8Codebooks books;
    float *capture;           // CPU: the next step's gradient goes here first (trainer_capture_grads)
    // GPU
    GpuModel gpu;
    GpuSettings gs;
    double peak_flops;  // device peak bf16 FLOP/s for MFU (0: unknown)
    char device[256];   // GPU name, or "cpu"
} Trainer;

typedef struct {
    float loss, grad_norm;
    int applied;  // 0: the update was skipped (non-finite loss or norm)
} StepOut;

static double gib(size_t b) { return (double)b / (1024.0 * 1024.0 * 1024.0); }

static size_t physical_memory(void) { return (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)sysconf(_SC_PAGESIZE); }

// Values that train: every parameter, or with LoRA the adapters.
static size_t trainable_count(const ModelConfig *c, const LoraConfig *lc) {
    if (lc->rank > 0) {
        LoraLayout L;
        lora_layout_init(&L, c, lc);
        return L.total;
    }
    ParamLayout l;
    param_layout_init(&l, c);
    return l.total;
}

// Bytes the CPU path allocates: the model (params, grads or adapters, activations) and two fp32
// moments of the trainable values (adam8: the 8-bit codes and block scales).
static size_t cpu_path_bytes(const ModelConfig *c, const LoraConfig *lc, int B, int S, int adam8) {
    ParamLayout l;
    param_layout_init(&l, c);
    Adam8Layout a;
    adam8_layout_init(&a, &l, c);
    return (size_t)((long long)cpu_model_bytes(c, B, S) + cpu_lora_bytes(c, lc, B, S)) +
           (adam8 ? adam8_state_bytes(&a) : 2 * trainable_count(c, lc) * sizeof(float));
}

// Dies when the CPU path would need more than half of this machine's memory for c at B x S.
static void cpu_path_check(const ModelConfig *c, const LoraConfig *lc, int B, int S, int adam8) {
    size_t need = cpu_path_bytes(c, lc, B, S, adam8), limit = physical_memory() / 2;
    ParamLayout l;
    param_layout_init(&l, c);
    if (need > limit)
        die("this model is too large for the CPU reference path: %s with %zu parameters at B=%d S=%d needs %.2f GiB "
            "(fp32 params, grads, activations, AdamW moments), more than half of this machine's %.2f GiB; "
            "train it on a GPU, or use a smaller model, --batch or --seq-len",
            family_name(c->family), l.total, B, S, gib(need), gib(physical_memory()));
}

// Dense bf16 tensor-core peak of the device, from its compute capability (H100/H200 SXM: 989 TFLOP/s).
static double gpu_peak_flops(char *name, size_t name_len) {
    cudaDeviceProp p;
    int device;
    cudaCheck(cudaGetDevice(&device));
    cudaCheck(cudaGetDeviceProperties(&p, device));
    snprintf(name, name_len, "%s", p.name);
    if (p.major == 9) return 989e12;
    if (p.major == 8 && p.minor == 0) return 312e12;
    if (p.major == 10) return 2250e12;
    return 0.0;
}

// The model's name in records: the preset, the model file, or "default".
static const char *model_name(const Options *o) { return o->preset ? o->preset : o->model ? o->model : "default"; }

// --plan-json: the plan, its totals and its step timeline (mst.h) as one JSON object.
static void write_plan_json(const char *path, const MemoryPlan *p, const ModelConfig *c, const char *model,
                            size_t device_budget, size_t host_budget, int fits) {
    FILE *f = fopenCheck(path, "w");
    mst_plan_write_json(p, c, model, device_budget, host_budget, fits, f);
    fcloseCheck(f, path);
    printf("memory plan JSON: %s\n", path);
}

static void trainer_init(Trainer *t, int backend, const ModelConfig *c, const uint16_t *params, const Options *o, Comm *comm) {
    memset(t, 0, sizeof(*t));
    t->backend = backend;
    t->c = *c;
    param_layout_init(&t->layout, c);
    t->B = t->B_local = o->batch;
    t->S = t->S_local = o->seq_len;
    t->grad_accum = o->grad_accum;
    t->lora = o->lora;
    t->n_train = trainable_count(c, &o->lora);
    t->adam8 = strcmp(o->optimizer, "adamw8bit") == 0;
    t->comm = comm;
    t->seq_parallel = o->seq_parallel;
    if (comm) {
        char err[256];
        if (!dist_local_shape(t->B, t->S, comm->world, t->seq_parallel, &t->B_local, &t->S_local, err, sizeof(err))) die("%s", err);
        t->part_inputs = (int *)mallocCheck((size_t)t->B_local * t->S_local * sizeof(int));
        t->part_targets = (int *)mallocCheck((size_t)t->B_local * t->S_local * sizeof(int));
    }
    snprintf(t->device, sizeof(t->device), "cpu");
    if (backend == BACKEND_CPU) {
        cpu_path_check(c, &t->lora, t->B, t->S, t->adam8);
        cpu_model_init(&t->cpu, c, t->B, t->S);
        if (t->lora.rank) cpu_model_init_lora(&t->cpu, &t->lora, o->seed);
        cpu_model_load_bf16(&t->cpu, params);
        if (!t->adam8) {
            t->mom1 = (float *)callocCheck(t->n_train, sizeof(float));
            t->mom2 = (float *)callocCheck(t->n_train, sizeof(float));
            return;
        }
        adam8_layout_init(&t->a8, &t->layout, c);
        adam8_codebooks_init(&t->books);
        size_t blocks = t->a8.total;
        t->q.m_codes = (uint8_t *)callocCheck(blocks, ADAM8_BLOCK);
        t->q.v_codes = (uint8_t *)callocCheck(blocks, ADAM8_BLOCK);
        t->q.m_absmax = (float *)callocCheck(blocks, sizeof(float));
        t->q.v_absmax = (float *)callocCheck(blocks, sizeof(float));
        return;
    }
    GpuSettings *s = &t->gs;
    s->B = t->B_local;
    s->S = t->S_local;
    s->comm = comm;
    s->seq_parallel = t->seq_parallel;
    s->mst_chunks = o->mst_chunks;
    s->vocab_chunk = o->vocab_chunk;
    s->recompute = o->recompute;
    s->offload = o->offload;
    s->host_layers = o->host_layers;
    s->attn_head_groups = o->attn_head_groups;
    s->attn_bwd_sliced = o->attn_bwd_sliced;
    s->attn_kept_layers = o->attn_kept_layers;
    s->grad_accum_steps = o->grad_accum;
    s->moment_type = strcmp(o->moments, "fp32") == 0 ? DT_FP32 : DT_BF16;
    s->moments_8bit = t->adam8;
    s->master_weights = o->master_weights;
    s->overlap_optimizer = o->overlap_optimizer;
    s->gpu_mem_budget = (size_t)(o->gpu_mem_gib * 1024.0 * 1024.0 * 1024.0);
    // --host-mem: the pinned budget of the host, shared by its ranks (0: gpu_model_init's default, shared too)
    s->host_mem_budget = (size_t)(o->host_mem_gib * 1024.0 * 1024.0 * 1024.0) / (size_t)(comm ? comm->local_world : 1);
    s->lora = o->lora;
    s->lora_seed = o->seed;
    s->init_seed = o->seed;
    gpu_model_init(&t->gpu, c, params, s);
    gpu_model_print_plan(&t->gpu, stdout);
    if (o->plan_json) write_plan_json(o->plan_json, &t->gpu.plan, c, model_name(o), s->gpu_mem_budget, s->host_mem_budget, 1);
    t->peak_flops = gpu_peak_flops(t->device, sizeof(t->device)) * (comm ? comm->world : 1);  // MFU over every GPU
}

// This rank's part of a global batch (inputs, targets (B, S)); itself on one GPU.
static void trainer_part(Trainer *t, const int **inputs, const int **targets) {
    if (t->comm == NULL) return;
    int world = t->comm->world, rank = t->comm->rank;
    dist_slice_batch(t->part_inputs, *inputs, t->B, t->S, world, rank, t->seq_parallel);
    dist_slice_batch(t->part_targets, *targets, t->B, t->S, world, rank, t->seq_parallel);
    *inputs = t->part_inputs;
    *targets = t->part_targets;
}

// One optimizer step: grad_accum micro-batches from the train loader, then AdamW with clipping.
// CPU: the update is applied only when the loss and the norm are finite (or the run stops).
// GPU: the update runs inside the backward pass (gpu_model.h), so it cannot be held back.
static void trainer_step(Trainer *t, Batches *dl, const OptimizerStep *opt, StepOut *out) {
    out->loss = 0.0f;
    out->grad_norm = 0.0f;
    out->applied = 1;
    if (t->backend == BACKEND_GPU) {
        StepResult r;
        double loss = 0.0;
        for (int k = 0; k < t->grad_accum; k++) {
            batches_next(dl);
            const int *inputs = dl->inputs, *targets = dl->targets;
            trainer_part(t, &inputs, &targets);
            gpu_model_train_micro_step(&t->gpu, inputs, targets, k, opt, &r);
            loss += r.loss;
        }
        out->loss = (float)(loss / t->grad_accum);
        out->grad_norm = r.grad_norm;
        return;
    }
    CpuModel *m = &t->cpu;
    cpu_model_zero_grad(m);
    double loss = 0.0;
    for (int k = 0; k < t->grad_accum; k++) {
        batches_next(dl);
        loss += cpu_model_forward(m, dl->inputs, dl->targets, t->B, t->S);
        cpu_model_backward(m);
    }
    float scale = 1.0f / t->grad_accum;  // the gradients summed over micro-batches -> their mean
    if (t->capture) {
        for (size_t i = 0; i < t->layout.total; i++) t->capture[i] = m->grads[i] * scale;
        t->capture = NULL;
    }
    out->loss = (float)(loss / t->grad_accum);
    out->grad_norm = cpu_grad_norm(m) * scale;
    if (!isfinite(out->loss) || !isfinite(out->grad_norm)) {
        out->applied = 0;
        return;
    }
    if (opt->clip > 0.0f && out->grad_norm > opt->clip) scale *= opt->clip / out->grad_norm;
    AdamWHparams h = {opt->lr, opt->beta1, opt->beta2, opt->eps, opt->weight_decay};
    if (t->adam8) cpu_adamw8bit_step(m, &t->q, &t->a8, &t->books, &h, opt->step, scale);
    else cpu_adamw_step(m, t->mom1, t->mom2, &h, opt->step, scale);
}

// The next step's gradient (the mean over its micro-batches, summed over the GPUs, before clipping)
// is copied to buf first: rank 0's buffer; the other ranks pass NULL.
static void trainer_capture_grads(Trainer *t, float *buf) {
    if (t->backend == BACKEND_GPU) gpu_model_capture_grads(&t->gpu, buf);
    else t->capture = buf;
}

static float trainer_eval_loss(Trainer *t, const int32_t *tokens, const int32_t *targets) {
    trainer_part(t, &tokens, &targets);
    if (t->backend == BACKEND_GPU) return gpu_model_eval_loss(&t->gpu, tokens, targets);
    return cpu_model_forward(&t->cpu, tokens, targets, t->B, t->S);
}

// logits (V) at the last of n_tokens (1 <= n_tokens <= S) tokens of one sequence (every rank
// calls it with the same tokens: sequence parallel runs it together, data parallel each rank alone).
static void trainer_next_logits(Trainer *t, const int32_t *tokens, int n_tokens, float *logits) {
    if (t->backend == BACKEND_GPU) {
        gpu_model_next_token_logits(&t->gpu, tokens, n_tokens, logits);
        return;
    }
    cpu_model_forward(&t->cpu, tokens, NULL, 1, n_tokens);
    memcpy(logits, t->cpu.logits + (size_t)(n_tokens - 1) * t->c.vocab_size, (size_t)t->c.vocab_size * sizeof(float));
}

static void trainer_get_params(Trainer *t, uint16_t *params_bf16) {
    if (t->backend == BACKEND_GPU) gpu_model_get_params(&t->gpu, params_bf16);
    else cpu_model_store_bf16(&t->cpu, params_bf16);
}

// LoRA adapters (n_train fp32) out of / into the model: lora_<step>.bin holds them.
static void trainer_get_lora(Trainer *t, float *out) {
    if (t->backend == BACKEND_GPU) gpu_model_get_lora(&t->gpu, out);
    else memcpy(out, t->cpu.lora_params, t->n_train * sizeof(float));
}

static void trainer_set_lora(Trainer *t, const float *in) {
    if (t->backend == BACKEND_GPU) gpu_model_set_lora(&t->gpu, in);
    else memcpy(t->cpu.lora_params, in, t->n_train * sizeof(float));
}

// Optimizer state for the checkpoint. CPU: m1 | m2 (fp32) | fp32 trainable values (the master
// weights, or the adapters); with adamw8bit m codes | m scales | v codes | v scales (adamw8bit.h) |
// fp32 params. GPU: the blob of gpu_model_get_optimizer_state (moments, master weights, previous
// grad norm).
#define CPU_STATE_PIECES 5

// The CPU path's state buffers in blob order; returns how many.
static int cpu_state_pieces(Trainer *t, void **ptr, size_t *bytes) {
    size_t n = t->n_train, blocks = t->a8.total;
    int k = 0;
    if (t->adam8) {
        ptr[k] = t->q.m_codes; bytes[k++] = blocks * ADAM8_BLOCK;
        ptr[k] = t->q.m_absmax; bytes[k++] = blocks * sizeof(float);
        ptr[k] = t->q.v_codes; bytes[k++] = blocks * ADAM8_BLOCK;
        ptr[k] = t->q.v_absmax; bytes[k++] = blocks * sizeof(float);
    } else {
        ptr[k] = t->mom1; bytes[k++] = n * sizeof(float);
        ptr[k] = t->mom2; bytes[k++] = n * sizeof(float);
    }
    ptr[k] = cpu_model_trainable_params(&t->cpu); bytes[k++] = n * sizeof(float);
    return k;
}

static size_t trainer_state_bytes(Trainer *t) {
    if (t->backend == BACKEND_GPU) return gpu_model_optimizer_state_bytes(&t->gpu);
    void *ptr[CPU_STATE_PIECES];
    size_t bytes[CPU_STATE_PIECES], total = 0;
    int n = cpu_state_pieces(t, ptr, bytes);
    for (int i = 0; i < n; i++) total += bytes[i];
    return total;
}

static void trainer_get_state(Trainer *t, void *buf) {
    if (t->backend == BACKEND_GPU) {
        gpu_model_get_optimizer_state(&t->gpu, buf);
        return;
    }
    void *ptr[CPU_STATE_PIECES];
    size_t bytes[CPU_STATE_PIECES], at = 0;
    int n = cpu_state_pieces(t, ptr, bytes);
    for (int i = 0; i < n; i++) {
        memcpy((char *)buf + at, ptr[i], bytes[i]);
        at += bytes[i];
    }
}

static void trainer_set_state(Trainer *t, const void *buf) {
    if (t->backend == BACKEND_GPU) {
        gpu_model_set_optimizer_state(&t->gpu, buf);
        return;
    }
    void *ptr[CPU_STATE_PIECES];
    size_t bytes[CPU_STATE_PIECES], at = 0;
    int n = cpu_state_pieces(t, ptr, bytes);
    for (int i = 0; i < n; i++) {
        memcpy(ptr[i], (const char *)buf + at, bytes[i]);
        at += bytes[i];
    }
}

typedef struct { double used, total, plan, peak; } MemLine;  // GiB

static MemLine trainer_memory(Trainer *t) {
    MemLine l;
    if (t->backend == BACKEND_GPU) {
        MemoryReport r;
        gpu_model_memory_report(&t->gpu, &r);
        l.used = gib(r.device_used);
        l.total = gib(r.device_total);
        l.plan = gib(r.planned);
        l.peak = gib(r.peak_used);
    } else {
        l.used = l.plan = l.peak = gib(cpu_path_bytes(&t->c, &t->lora, t->B, t->S, t->adam8));
        l.total = gib(physical_memory());
    }
    return l;
}

static void trainer_free(Trainer *t) {
    free(t->part_inputs);
    free(t->part_targets);
    if (t->backend == BACKEND_GPU) {
        gpu_model_free(&t->gpu);
        gpu_model_release_handles();
        return;
    }
    cpu_model_free(&t->cpu);
    free(t->mom1);
    free(t->mom2);
    free(t->q.m_codes);
    free(t->q.v_codes);
    free(t->q.m_absmax);
    free(t->q.v_absmax);
}

// ----------------------------------------------------------------------------
// Checkpoints: <dir>/model_<step>.bin (model.bin, bf16: the weights for export), or with LoRA
// <dir>/lora_<step>.bin (lora.h: the adapters, fp32; the base stays the --model file), and
// <dir>/state_<step>.bin, each written to a .tmp file and renamed.
//
// state_<step>.bin, little-endian: STATE_HEADER_INTS int64
//   [0] magic STATE_MAGIC ('M','T','S','S')  [1] version  [2] backend (0 CPU, 1 GPU)  [3] step
//   [4] trainable values (parameters, or adapter elements)  [5] FNV-1a hash of the model.bin header of the config
//   [6] RNG state  [7..11] DataPosition of the train loader (epoch, shard, cursor, seq_len, n_shards)
//   [12] payload bytes  [13] moment type (GPU)  [14] master weights (GPU)  [15] FNV-1a hash of the payload
//   [16] optimizer: 0 adamw, 1 adamw8bit (version 2; version 1 files have 0 here and are read as adamw)
//   [17] LoRA rank (0: none)  [18] LoRA target mask  [19] LoRA alpha (float32 bits)  [20] base quantization
//   rest 0
// then the payload: trainer_get_state's bytes (CPU: fp32 m1 | m2 | params, or 8-bit m codes | m scales
// | v codes | v scales | fp32 params; GPU: gpu_model's blob, which holds the previous grad norm used
// by the optimizer-in-backward clip).

#define STATE_MAGIC 0x5353544DLL  // bytes 'M','T','S','S'
#define STATE_VERSION 2
#define STATE_VERSION_MIN 1       // the oldest version this build reads
#define STATE_HEADER_INTS 64

static uint64_t fnv1a(const void *data, size_t n, uint64_t h) {
    const unsigned char *p = (const unsigned char *)data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001B3ULL;
    return h;
}

static int64_t config_hash(const ModelConfig *c) {
    int32_t header[MODEL_HEADER_INTS];
    config_to_header(c, header);
    return (int64_t)fnv1a(header, sizeof(header), 0xCBF29CE484222325ULL);
}

static void ckpt_path(char *out, size_t len, const char *dir, const char *kind, int step) {
    snprintf(out, len, "%s/%s_%d.bin", dir, kind, step);
}

// The weights file that goes with state_<step>.bin: "model" (model.bin) or "lora" (adapters only).
static const char *ckpt_weights_kind(const LoraConfig *lc) { return lc->rank > 0 ? "lora" : "model"; }

static void ensure_dir(const char *dir) {
    struct stat st;
    if (stat(dir, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) die("--ckpt-dir %s exists and is not a directory", dir);
        return;
    }
    if (mkdir(dir, 0755) != 0) die("cannot create checkpoint directory %s: %s", dir, strerror(errno));
}

// Steps of the checkpoints in dir that have both files (state and weights of `kind`), ascending.
// Returns the count (*steps malloc'd).
static int ckpt_list(const char *dir, const char *kind, int **steps) {
    char pattern[4096];
    snprintf(pattern, sizeof(pattern), "%s/state_*.bin", dir);
    glob_t g;
    int n = 0;
    *steps = NULL;
    if (glob(pattern, 0, NULL, &g) != 0) return 0;
    *steps = (int *)mallocCheck(g.gl_pathc * sizeof(int));
    for (size_t i = 0; i < g.gl_pathc; i++) {
        const char *base = strrchr(g.gl_pathv[i], '/') + 1;
        int step;
        char tail[8], model[4096];
        if (sscanf(base, "state_%d%7s", &step, tail) != 2 || strcmp(tail, ".bin") != 0) continue;
        ckpt_path(model, sizeof(model), dir, kind, step);
        if (access(model, R_OK) == 0) (*steps)[n++] = step;
    }
    globfree(&g);
    for (int i = 1; i < n; i++)  // insertion sort: a handful of entries
        for (int j = i; j > 0 && (*steps)[j - 1] > (*steps)[j]; j--) {
            int x = (*steps)[j];
            (*steps)[j] = (*steps)[j - 1];
            (*steps)[j - 1] = x;
        }
    return n;
}

// Deletes all but the newest keep checkpoints.
static void ckpt_prune(const char *dir, const char *kind, int keep) {
    int *steps, n = ckpt_list(dir, kind, &steps);
    for (int i = 0; i < n - keep; i++) {
        char p[4096];
        ckpt_path(p, sizeof(p), dir, kind, steps[i]);
        if (remove(p) != 0) die("cannot delete old checkpoint %s: %s", p, strerror(errno));
        ckpt_path(p, sizeof(p), dir, "state", steps[i]);
        if (remove(p) != 0) die("cannot delete old checkpoint %s: %s", p, strerror(errno));
    }
    free(steps);
}

// Several GPUs: rank 0 writes both files; the other ranks only send it their optimizer-state parts.
static void ckpt_save(Trainer *t, const char *dir, int keep, int step, uint64_t rng, DataPosition pos) {
    if (t->comm && t->comm->rank != 0) {  // several GPUs run the GPU path
        gpu_model_get_optimizer_state(&t->gpu, NULL);
        return;
    }
    ensure_dir(dir);
    char path[4000], tmp[4100];
    ckpt_path(path, sizeof(path), dir, ckpt_weights_kind(&t->lora), step);
    if (t->lora.rank) {
        float *adapters = (float *)mallocCheck(t->n_train * sizeof(float));
        trainer_get_lora(t, adapters);
        lora_save(path, &t->c, &t->lora, adapters);
        free(adapters);
    } else {
        uint16_t *bf16 = (uint16_t *)mallocCheck(t->layout.total * sizeof(uint16_t));
        trainer_get_params(t, bf16);
        model_save_bf16(&t->c, bf16, path);
        free(bf16);
    }

    size_t bytes = trainer_state_bytes(t);
    void *payload = mallocCheck(bytes);
    trainer_get_state(t, payload);
    int64_t h[STATE_HEADER_INTS];
    memset(h, 0, sizeof(h));
    h[0] = STATE_MAGIC;
    h[1] = STATE_VERSION;
    h[2] = t->backend;
    h[3] = step;
    h[4] = (int64_t)t->n_train;
    h[5] = config_hash(&t->c);
    h[6] = (int64_t)rng;
    h[7] = pos.epoch;
    h[8] = pos.shard;
    h[9] = pos.cursor;
    h[10] = pos.seq_len;
    h[11] = pos.n_shards;
    h[12] = (int64_t)bytes;
    h[13] = t->backend == BACKEND_GPU ? (int64_t)t->gs.moment_type : 0;
    h[14] = t->backend == BACKEND_GPU ? t->gs.master_weights : 0;
    h[15] = (int64_t)fnv1a(payload, bytes, 0xCBF29CE484222325ULL);
    h[16] = t->adam8;
    h[17] = t->lora.rank;
    h[18] = t->lora.rank ? (int64_t)t->lora.targets : 0;
    memcpy(&h[19], &t->lora.alpha, sizeof(float));
    h[20] = t->lora.base_quant;
    ckpt_path(path, sizeof(path), dir, "state", step);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopenCheck(tmp, "wb");
    fwriteCheck(h, sizeof(int64_t), STATE_HEADER_INTS, f, tmp);
    fwriteCheck(payload, 1, bytes, f, tmp);
    fcloseCheck(f, tmp);
    rename_check(tmp, path);
    free(payload);
    ckpt_prune(dir, ckpt_weights_kind(&t->lora), keep);
    printf("checkpoint: %s/%s_%d.bin + state_%d.bin\n", dir, ckpt_weights_kind(&t->lora), step, step);
}

// Reads the state file header; checks magic, version, size and that it belongs to model c with LoRA lc.
static void state_read_header(int64_t h[STATE_HEADER_INTS], const char *path, const ModelConfig *c, const LoraConfig *lc) {
    FILE *f = fopenCheck(path, "rb");
    long size = file_size_bytes(f, path);
    if (size < (long)(STATE_HEADER_INTS * sizeof(int64_t)))
        die("%s: truncated: %ld bytes, smaller than the %zu-byte state header", path, size, STATE_HEADER_INTS * sizeof(int64_t));
    freadCheck(h, sizeof(int64_t), STATE_HEADER_INTS, f, path);
    fcloseCheck(f, path);
    if (h[0] != STATE_MAGIC) die("%s: bad magic 0x%08llx (expected 0x%08llx): not a train_llama state file", path, (unsigned long long)h[0], (unsigned long long)STATE_MAGIC);
    if (h[1] < STATE_VERSION_MIN || h[1] > STATE_VERSION)
        die("%s: unsupported state version %lld (this build reads versions %d to %d)", path, (long long)h[1], STATE_VERSION_MIN, STATE_VERSION);
    if (h[12] < 0 || size != (long)(STATE_HEADER_INTS * sizeof(int64_t)) + h[12])
        die("%s: size %ld bytes disagrees with its header (%lld payload bytes): %s", path, size, (long long)h[12],
            size < (long)(STATE_HEADER_INTS * sizeof(int64_t)) + h[12] ? "truncated" : "trailing bytes");
    float alpha;
    memcpy(&alpha, &h[19], sizeof(float));
    if (h[17] != lc->rank || (lc->rank && (h[18] != (int64_t)lc->targets || alpha != lc->alpha)) || h[20] != lc->base_quant) {
        char want[64], got[64];
        lora_targets_string(lc->targets, want, sizeof(want));
        lora_targets_string((unsigned)h[18], got, sizeof(got));
        die("%s: written with LoRA rank %lld alpha %g targets %s base %s; this run has rank %d alpha %g targets %s base %s "
            "(resume with the same --lora-* and --base-quant flags)", path, (long long)h[17], alpha, h[17] ? got : "-",
            base_quant_name((int)h[20]), lc->rank, lc->alpha, lc->rank ? want : "-", base_quant_name(lc->base_quant));
    }
    size_t n_train = trainable_count(c, lc);
    if (h[4] != (int64_t)n_train || h[5] != config_hash(c))
        die("%s: the state belongs to another model (%lld trainable values, config hash %016llx; the model has %zu, %016llx)",
            path, (long long)h[4], (unsigned long long)h[5], n_train, (unsigned long long)config_hash(c));
}

// Loads the state into the trainer; returns the step, sets *rng and *pos.
static int state_load(Trainer *t, const char *path, uint64_t *rng, DataPosition *pos) {
    int64_t h[STATE_HEADER_INTS];
    state_read_header(h, path, &t->c, &t->lora);
    if (h[2] != t->backend)
        die("%s: written by the %s path; this run uses the %s path (the optimizer states differ: resume on the same backend)",
            path, h[2] == BACKEND_GPU ? "GPU" : "CPU", t->backend == BACKEND_GPU ? "GPU" : "CPU");
    if (h[16] != t->adam8)
        die("%s: written with --optimizer %s; this run uses --optimizer %s (the optimizer states differ: resume with the same optimizer)",
            path, h[16] ? "adamw8bit" : "adamw", t->adam8 ? "adamw8bit" : "adamw");
    size_t bytes = trainer_state_bytes(t);
    if ((size_t)h[12] != bytes)
        die("%s: %lld bytes of optimizer state, this run needs %zu (other --moments or --master-weights? the file has moments %s, master %lld)",
            path, (long long)h[12], bytes, h[13] == DT_FP32 ? "fp32" : "bf16", (long long)h[14]);
    void *payload = mallocCheck(bytes);
    FILE *f = fopenCheck(path, "rb");
    fseekCheck(f, STATE_HEADER_INTS * sizeof(int64_t), SEEK_SET, path);
    freadCheck(payload, 1, bytes, f, path);
    fcloseCheck(f, path);
    if ((int64_t)fnv1a(payload, bytes, 0xCBF29CE484222325ULL) != h[15]) die("%s: corrupted: the optimizer state's checksum does not match", path);
    trainer_set_state(t, payload);
    free(payload);
    *rng = (uint64_t)h[6];
    pos->epoch = h[7];
    pos->shard = h[8];
    pos->cursor = h[9];
    pos->seq_len = h[10];
    pos->n_shards = h[11];
    return (int)h[3];
}

// --resume latest|PATH -> the state file path; the weights file is its model_<step>.bin sibling
// (lora_<step>.bin with LoRA).
static void resume_paths(const Options *o, char *state, char *model, size_t len) {
    const char *kind = ckpt_weights_kind(&o->lora);
    if (strcmp(o->resume, "latest") == 0) {
        int *steps, n = ckpt_list(o->ckpt_dir, kind, &steps);
        if (n == 0) die("--resume latest: no checkpoint (%s_<step>.bin + state_<step>.bin) in %s", kind, o->ckpt_dir);
        ckpt_path(state, len, o->ckpt_dir, "state", steps[n - 1]);
        ckpt_path(model, len, o->ckpt_dir, kind, steps[n - 1]);
        free(steps);
        return;
    }
    snprintf(state, len, "%s", o->resume);
    const char *slash = strrchr(o->resume, '/');
    const char *base = slash ? slash + 1 : o->resume;
    if (strncmp(base, "state_", 6) != 0) die("--resume %s: expected 'latest' or a path to a state_<step>.bin file", o->resume);
    snprintf(model, len, "%.*s%s_%s", (int)(base - o->resume), o->resume, kind, base + 6);
}

// ----------------------------------------------------------------------------
// Sampling: temperature + top-p with the trainer's RNG, printed through the tokenizer.

typedef struct { float p; int id; } ProbId;

static int cmp_prob_desc(const void *a, const void *b) {
    float x = ((const ProbId *)a)->p, y = ((const ProbId *)b)->p;
    return x < y ? 1 : (x > y ? -1 : ((const ProbId *)a)->id - ((const ProbId *)b)->id);
}

// Picks a token id < n from logits (n): greedy when temperature is 0, else from the smallest set of
// most likely tokens whose probability reaches top_p.
static int sample_token(const float *logits, int n, float temperature, float top_p, ProbId *buf, uint64_t *rng) {
    int best = 0;
    for (int i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
    if (temperature == 0.0f) return best;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        buf[i].id = i;
        buf[i].p = expf((logits[i] - logits[best]) / temperature);
        sum += buf[i].p;
    }
    if (!(sum > 0.0) || !isfinite(sum)) return best;  // non-finite logits: nothing to sample from
    qsort(buf, n, sizeof(ProbId), cmp_prob_desc);
    double cum = 0.0;
    int keep = 0;
    while (keep < n && cum < top_p * sum) cum += buf[keep++].p;
    double r = rng_uniform(rng) * cum, acc = 0.0;
    for (int i = 0; i < keep; i++) {
        acc += buf[i].p;
        if (r < acc) return buf[i].id;
    }
    return buf[keep - 1].id;
}

static void sample_text(Trainer *t, const Tokenizer *tok, const Options *o, uint64_t *rng) {
    int S = t->S, V = t->c.vocab_size, cap = o->sample_tokens + 4096;
    int32_t *ids = (int32_t *)mallocCheck((size_t)cap * sizeof(int32_t));
    int n = 0;
    if (tok->bos_id >= 0) ids[n++] = tok->bos_id;
    if (tok->pretokenizer != PRETOK_NONE) n += tokenizer_encode(tok, o->prompt, ids + n, cap - n - o->sample_tokens);
    else printf("(this tokenizer is decode-only: sampling from BOS, not from the prompt)\n");
    if (n == 0) ids[n++] = 0;
    float *logits = (float *)mallocCheck((size_t)V * sizeof(float));
    ProbId *buf = (ProbId *)mallocCheck((size_t)V * sizeof(ProbId));
    printf("sample: ");
    for (int i = 0; i < n; i++) {
        if (ids[i] == tok->bos_id) continue;
        size_t len;
        const unsigned char *b = tokenizer_decode(tok, ids[i], &len);
        fwrite(b, 1, len, stdout);
    }
    for (int k = 0; k < o->sample_tokens; k++) {
        int ctx = n < S ? n : S;  // the last S tokens at most
        trainer_next_logits(t, ids + n - ctx, ctx, logits);
        int id = sample_token(logits, tok->vocab_size, o->temperature, o->top_p, buf, rng);
        if (id == tok->eos_id) break;
        ids[n++] = id;
        size_t len;
        const unsigned char *b = tokenizer_decode(tok, id, &len);
        fwrite(b, 1, len, stdout);
    }
    printf("\n");
    fflush(stdout);
    free(ids);
    free(logits);
    free(buf);
}

// ----------------------------------------------------------------------------
// Evaluation: mean loss over the first eval_batches batches of the validation loader.

static void evaluate(Trainer *t, Batches *val, int n_batches, int step, FILE *log) {
    if (n_batches == 0) return;
    batches_reset(val);
    double sum = 0.0;
    for (int i = 0; i < n_batches; i++) {
        batches_next(val);
        sum += trainer_eval_loss(t, val->inputs, val->targets);
    }
    double loss = sum / n_batches;
    printf("eval step %d | val loss %.4f | val ppl %.2f (%d batches)\n", step, loss, exp(loss), n_batches);
    if (log) {
        fprintf(log, "{\"step\": %d, \"val_loss\": %.6f, \"val_ppl\": %.4f}\n", step, loss, exp(loss));
        fflush(log);
    }
}

// ----------------------------------------------------------------------------
// The loop: learning rate, FLOPs, the log line.

static float lr_at(const Options *o, int step) {
    if (o->warmup > 0 && step <= o->warmup) return o->lr * step / o->warmup;
    float min_lr = o->lr * o->min_lr_frac;
    int span = o->steps - o->warmup;
    float progress = span > 0 ? (float)(step - o->warmup) / span : 1.0f;
    if (strcmp(o->schedule, "constant") == 0) return o->lr;
    if (strcmp(o->schedule, "linear") == 0) return o->lr - (o->lr - min_lr) * progress;
    return min_lr + (o->lr - min_lr) * 0.5f * (1.0f + cosf(3.14159265f * progress));
}

// Model FLOPs per token of a training step (forward + backward, no recomputation counted):
// 6 * P, with P the matmul parameters (layers + LM head, config_matmul_params), plus attention:
// per layer Q.K^T and P.V are 2 * 2 * K * Hq * hd in forward, x3 with backward -> 12 K Hq hd, with K
// the keys a query is counted against: S (the causal half is not subtracted, as in the PaLM MFU
// formula), or the sliding window of a windowed layer where it is shorter than S. With LoRA the
// frozen base needs no weight gradients (4 P instead of 6 P) and the adapters add 6 per adapter value.
static double flops_per_token(const ModelConfig *c, const LoraConfig *lc, int S) {
    double keys = 0.0;
    for (int l = 0; l < c->n_layers; l++)
        keys += config_layer_is_sliding(c, l) && c->sliding_window < S ? c->sliding_window : S;
    double attention = 12.0 * keys * c->n_heads * c->head_dim;
    if (lc->rank) return 4.0 * (double)config_matmul_params(c) + 6.0 * (double)trainable_count(c, lc) + attention;
    return 6.0 * (double)config_matmul_params(c) + attention;
}

// 12,345 style integer.
static const char *commas(double v, char *buf, size_t len) {
    char raw[64];
    snprintf(raw, sizeof(raw), "%.0f", v);
    int n = (int)strlen(raw), o = 0;
    for (int i = 0; i < n && o + 2 < (int)len; i++) {
        buf[o++] = raw[i];
        if ((n - i - 1) % 3 == 0 && i < n - 1) buf[o++] = ',';
    }
    buf[o] = '\0';
    return buf;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void log_step(Trainer *t, int step, int steps, const StepOut *r, float lr, double ms, FILE *log) {
    double tokens = (double)t->B * t->S * t->grad_accum;
    double tok_s = tokens / (ms / 1e3), flops = flops_per_token(&t->c, &t->lora, t->S) * tok_s;
    MemLine m = trainer_memory(t);
    char tk[64], mfu[32];
    if (t->backend == BACKEND_GPU && t->peak_flops > 0) snprintf(mfu, sizeof(mfu), "MFU %.1f%%", 100.0 * flops / t->peak_flops);
    else snprintf(mfu, sizeof(mfu), "MFU n/a (cpu)");
    printf("step %d/%d | loss %.4f | lr %.1e | norm %.2f | %.0f ms | %s tok/s | %.3f TFLOP/s | %s | ", step, steps,
           r->loss, lr, r->grad_norm, ms, commas(tok_s, tk, sizeof(tk)), flops / 1e12, mfu);
    if (t->backend == BACKEND_GPU) printf("mem %.2f/%.1f GiB (plan %.2f)\n", m.used, m.total, m.plan);
    else printf("mem %.2f/%.1f GiB host (cpu)\n", m.used, m.total);
    fflush(stdout);
    if (!log) return;
    char mfu_json[32];
    if (t->backend == BACKEND_GPU && t->peak_flops > 0) snprintf(mfu_json, sizeof(mfu_json), "%.6f", flops / t->peak_flops);
    else snprintf(mfu_json, sizeof(mfu_json), "null");
    fprintf(log,
            "{\"step\": %d, \"loss\": %.6f, \"lr\": %.6e, \"grad_norm\": %.6f, \"ms\": %.3f, \"tok_per_s\": %.1f, \"tflops\": %.6f, "
            "\"mfu\": %s, \"mem_gib\": %.4f, \"mem_plan_gib\": %.4f, \"peak_gib\": %.4f, \"backend\": \"%s\"}\n",
            step, r->loss, lr, r->grad_norm, ms, tok_s, flops / 1e12, mfu_json, m.used, m.plan, m.peak,
            t->backend == BACKEND_GPU ? "gpu" : "cpu");
    fflush(log);
}

// --bench: prints a JSON string value with quotes, backslashes and control characters escaped.
static void json_string(FILE *f, const char *v) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)v; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
        else if (*p < 0x20) fprintf(f, "\\u%04x", *p);
        else fputc(*p, f);
    }
    fputc('"', f);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : (x > y ? 1 : 0);
}

// --bench: one line "BENCH {json}" from the step times ms[0..n) of this run (the first
// BENCH_WARMUP left out, or all but the last when n <= BENCH_WARMUP; a lone step is timed with its
// warm-up, for runs where one step is all there is time for): the median step, tok/s,
// TFLOP/s and MFU from it, the resolved memory settings, the peak device memory seen
// (cudaMemGetInfo: includes the CUDA context) and the planned arena.
static void print_bench(Trainer *t, const Options *o, double *ms, int n) {
    if (n < 1) die("--bench: no step ran in this run");
    int warm = n > BENCH_WARMUP ? BENCH_WARMUP : n - 1, k = n - warm;
    double *x = ms + warm;
    qsort(x, k, sizeof(double), cmp_double);
    double med = k % 2 ? x[k / 2] : 0.5 * (x[k / 2 - 1] + x[k / 2]);
    double tok_s = (double)t->B * t->S * t->grad_accum / (med / 1e3), fpt = flops_per_token(&t->c, &t->lora, t->S);
    int gpu = t->backend == BACKEND_GPU;
    MemLine m = trainer_memory(t);
    printf("BENCH {\"model\": ");
    json_string(stdout, model_name(o));
    printf(", \"backend\": \"%s\", \"device\": ", gpu ? "gpu" : "cpu");
    json_string(stdout, t->device);
    printf(", \"gpus\": %d, \"seq_parallel\": %d", t->comm ? t->comm->world : (gpu ? 1 : 0), t->seq_parallel);
    printf(", \"B\": %d, \"S\": %d, \"grad_accum\": %d, \"M\": %d, \"vocab_chunk\": %d, \"recompute\": %d, "
           "\"attn_kept_layers\": %d, \"offload\": %d, \"host_layers\": %d, \"optimizer\": \"%s\", \"moments\": \"%s\", \"master_weights\": %d, "
           "\"synthetic\": %d, \"lora_rank\": %d, \"base_quant\": \"%s\", "
           "\"steps_timed\": %d, \"warmup\": %d, \"median_ms\": %.3f, \"tok_s\": %.1f, \"tflops\": %.4f, \"mfu\": ",
           t->B, t->S, t->grad_accum, gpu ? t->gs.mst_chunks : 1, gpu ? t->gs.vocab_chunk : t->c.vocab_size,
           gpu ? t->gs.recompute : 0, gpu ? t->gs.attn_kept_layers : 0, gpu ? t->gs.offload : 0, gpu ? t->gs.host_layers : 0, o->optimizer,
           t->adam8 ? "8bit" : o->moments, o->master_weights, o->synthetic, o->lora.rank,
           base_quant_name(o->lora.base_quant), k, warm, med, tok_s, fpt * tok_s / 1e12);
    if (gpu && t->peak_flops > 0) printf("%.6f", fpt * tok_s / t->peak_flops);
    else printf("null");
    printf(", \"peak_gib\": %.4f, \"planned_gib\": %.4f, \"params\": %zu, \"flops_per_token\": %.6e, \"oom\": false}\n",
           m.peak, m.plan, t->layout.total, fpt);
    fflush(stdout);
}

static volatile sig_atomic_t g_stop = 0;  // set by SIGINT / SIGTERM; checked at the end of each step

static void on_signal(int sig) { g_stop = sig; }

// ----------------------------------------------------------------------------
// --plan-only: the memory plan from a preset or a model.bin header, no GPU and no weights.

static int plan_only(const Options *o) {
    ModelConfig c;
    if (o->preset) {
        if (!mst_preset(o->preset, &c)) {
            fprintf(stderr, "error: unknown --preset '%s'; known:", o->preset);
            for (int i = 0; i < MST_PRESET_COUNT; i++) fprintf(stderr, " %s", MST_PRESETS[i]);
            fprintf(stderr, "\n");
            return 1;
        }
    } else if (o->model) {
        model_read_config(&c, o->model);
    } else {
        die("--plan-only needs --preset NAME or --model PATH");
    }
    if (o->gpu_mem_gib <= 0.0f) die("--plan-only needs --gpu-mem GiB (the device budget to plan for)");
    MstSettings s;
    memset(&s, 0, sizeof(s));
    s.B = o->batch_given ? o->batch : 1;
    s.S = o->seq_len;
    s.mst_chunks = o->mst_chunks;
    s.vocab_chunk = o->vocab_chunk;
    s.recompute = o->recompute;
    s.offload = o->offload;
    s.host_layers = o->host_layers;
    s.attn_head_groups = o->attn_head_groups;
    s.attn_bwd_sliced = o->attn_bwd_sliced;
    s.attn_kept_layers = o->attn_kept_layers;
    s.grad_accum_steps = o->grad_accum;
    s.moment_bytes = strcmp(o->optimizer, "adamw8bit") == 0 ? 1 : strcmp(o->moments, "fp32") == 0 ? 4 : 2;
    s.master_weights = o->master_weights;
    s.lora = o->lora;
    s.overlap_optimizer = o->overlap_optimizer && o->grad_accum == 1;
    int gpus = o->gpus > 0 ? o->gpus : 1;
    if (o->seq_parallel && gpus < 2) die("--plan-only --seq-parallel needs --gpus N with N >= 2");
    if (gpus > 1) {  // one GPU's part: its rows, or its tokens of every row
        char err[256];
        if (!dist_local_shape(s.B, o->seq_len, gpus, o->seq_parallel, &s.B, &s.S, err, sizeof(err))) die("%s", err);
        s.ranks = gpus;
        s.seq_parallel = o->seq_parallel;
    }
    MstKernelFigures fig;
    mst_kernel_figures_estimate(&c, s.B, s.S, &fig);
    size_t device = (size_t)(o->gpu_mem_gib * 1024.0 * 1024.0 * 1024.0);
    size_t host = (o->host_mem_gib > 0.0f ? (size_t)(o->host_mem_gib * 1024.0 * 1024.0 * 1024.0)
                                          : mst_default_host_budget(physical_memory())) / (size_t)gpus;
    MemoryPlan p;
    char msg[8192];
    printf("plan for %s (%s), B=%d S=%d, %d GPU%s, device budget %.1f GiB, host budget %.1f GiB (%s%s)\n",
           o->preset ? o->preset : o->model, family_name(c.family), o->batch_given ? o->batch : 1, o->seq_len, gpus,
           gpus > 1 ? (o->seq_parallel ? "s, sequence parallel" : "s, data parallel") : "", gib(device), gib(host),
           o->host_mem_gib > 0.0f ? "--host-mem" : "this machine's memory less 16 GiB, at least 3/4 of it",
           gpus > 1 ? ", shared by the GPUs" : "");
    int valid = mst_settings_check(&c, &s, msg, sizeof(msg)) == NULL;
    int fits = mst_plan_auto(&p, &c, &s, &fig, device, host, msg, sizeof(msg));
    // Refused for its settings: no plan to write. Refused for its size: the most frugal plan's JSON.
    if (o->plan_json && valid) write_plan_json(o->plan_json, &p, &c, model_name(o), device, host, fits);
    if (!fits) {
        printf("%s%s", msg, msg[0] && msg[strlen(msg) - 1] == '\n' ? "" : "\n");
        return 1;
    }
    mst_plan_print(&p, stdout);
    printf("fits: %.2f GiB device (arena %.2f + cuBLASLt %.2f), %.2f GiB pinned host\n",
           gib(p.device_total + p.device_external), gib(p.device_total), gib(p.device_external), gib(p.host_total));
    return 0;
}

// ----------------------------------------------------------------------------
// Several GPUs: starting the process group, the configuration every rank must share, and the
// gradient dump of --dump-grads.

// Meets the other ranks (dist.h, comm.h) when a launcher started several processes; returns NULL
// for a single process. Ranks other than 0 print nothing to stdout from here on (errors still go
// to stderr).
static Comm *start_ranks(const Options *o, Comm *comm) {
    DistEnv e;
    char err[512], dir[4096];
    if (!dist_env_read(&e, err, sizeof(err))) die("%s", err);
    if (e.world == 1) {
        if (o->seq_parallel) die("--seq-parallel splits sequences over several GPUs: start N processes (mpirun -np N ./train_llama ...)");
        if (o->gpus > 1) die("--gpus %d, but this process was started alone: start %d processes (mpirun -np %d ./train_llama ...)", o->gpus, o->gpus, o->gpus);
        return NULL;
    }
    if (o->gpus > 0 && o->gpus != e.world) die("rank %d: --gpus %d, but the launcher started %d processes", e.rank, o->gpus, e.world);
    if (o->cpu || cuda_device_count() == 0) die("rank %d: %d processes need a GPU each (the CPU reference path runs one process)", e.rank, e.world);
    if (!dist_rendezvous_dir(dir, sizeof(dir), &e, o->dist_dir, o->dist_id, err, sizeof(err))) die("%s", err);
    comm_init(comm, &e, dir, o->dist_timeout);
    if (e.rank > 0 && freopen("/dev/null", "w", stdout) == NULL) die("rank %d: cannot silence stdout: %s", e.rank, strerror(errno));
    printf("several GPUs: %d processes (%s), %s, rendezvous in %s; NCCL took %.0f MiB of GPU memory on rank 0\n", e.world, e.launcher,
           o->seq_parallel ? "sequence parallel (Ulysses)" : "data parallel", dir, comm->nccl_bytes / 1048576.0);
    return comm;
}

// A 64-bit hash of a printf-style text (FNV-1a).
static uint64_t text_hash(const char *fmt, ...) {
    char buf[8192];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);
    return fnv1a(buf, strlen(buf), 0xCBF29CE484222325ULL);
}

// Dies on every rank unless all ranks start from the same model (config and a sample of every 4099th
// weight; a preset drawn on the device: its seed) and the same settings of everything that decides
// which collectives run when.
static void check_same_run(Comm *comm, const Options *o, const ModelConfig *c, const uint16_t *params, size_t n, const char *state_file) {
    const char *items[6] = {"model", "batch shape", "memory settings", "optimizer", "data", "schedule of evaluations and checkpoints"};
    uint64_t h[6];
    h[0] = (uint64_t)config_hash(c);
    for (size_t i = 0; params != NULL && i < n; i += 4099) h[0] = (h[0] ^ params[i]) * 0x100000001B3ULL;
    h[1] = text_hash("%d %d %d %d", o->batch, o->seq_len, o->grad_accum, o->seq_parallel);
    h[2] = text_hash("%d %d %d %d %d %s %s %d %d %g", o->mst_chunks, o->vocab_chunk, o->recompute, o->offload, o->host_layers, o->moments,
                     o->optimizer, o->master_weights, o->overlap_optimizer, o->gpu_mem_gib);
    h[3] = text_hash("%g %g %d %s %g %g %g %g %g %d %llu", o->lr, o->min_lr_frac, o->warmup, o->schedule, o->weight_decay, o->beta1,
                     o->beta2, o->eps, o->clip, o->steps, (unsigned long long)o->seed);
    h[4] = text_hash("%s|%s|%s|%d|%s", o->train, o->val, o->tokenizer, o->synthetic, state_file);
    h[5] = text_hash("%d %d %d %d %d %d %d %d %s", o->eval_every, o->eval_batches, o->sample_every, o->sample_tokens, o->ckpt_every,
                     o->stop_after, o->checkpoints, o->dump_grads != NULL, o->ckpt_dir);
    comm_check_agreement(comm, items, h, 6);
}

// --dump-grads file: int64 header[8] = {DUMP_MAGIC, version 1, n, step, GPUs, sequence parallel, 0, 0},
// the model.bin header of the config (MODEL_HEADER_INTS int32), then n fp32 in the flat parameter order.
#define DUMP_MAGIC 0x4447544DLL  // bytes 'M','T','G','D'

static void dump_grads(const char *path, const ModelConfig *c, const float *g, size_t n, int step, int gpus, int seq_parallel) {
    int64_t h[8] = {DUMP_MAGIC, 1, (int64_t)n, step, gpus, seq_parallel, 0, 0};
    int32_t header[MODEL_HEADER_INTS];
    config_to_header(c, header);
    char tmp[4200];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopenCheck(tmp, "wb");
    fwriteCheck(h, sizeof(h[0]), 8, f, tmp);
    fwriteCheck(header, sizeof(header[0]), MODEL_HEADER_INTS, f, tmp);
    fwriteCheck(g, sizeof(float), n, f, tmp);
    fcloseCheck(f, tmp);
    rename_check(tmp, path);
    printf("gradient of step %d (%zu floats, summed over %d GPU%s) written to %s\n", step, n, gpus, gpus > 1 ? "s" : "", path);
}

// ----------------------------------------------------------------------------
// main

int main(int argc, char **argv) {
    Options o = options_parse(argc, argv);
    if (o.plan_only) return plan_only(&o);
    setvbuf(stdout, NULL, _IOLBF, 0);
    Comm comm_storage;
    Comm *comm = start_ranks(&o, &comm_storage);  // NULL: one process
    int rank0 = comm == NULL || comm->rank == 0;
    if (comm && o.lora.rank)
        die("--lora-rank trains on one GPU only: this run has %d ranks (the adapters' gradients are not exchanged between "
            "GPUs); start it without mpirun / torchrun", comm->world);

    // backend first: a --preset model is built only where it can be trained
    int backend = BACKEND_CPU;
    if (!o.cpu && cuda_device_count() > 0) backend = BACKEND_GPU;
    else if (!o.cpu) printf("no GPU found: training on the CPU reference path (fp32, OpenMP)\n");
    else printf("--cpu: training on the CPU reference path (fp32, OpenMP)\n");
    if (backend == BACKEND_CPU && o.plan_json)
        die("--plan-json writes the GPU memory plan: the CPU path has none (use it with --plan-only, or on a GPU)");
    if (backend == BACKEND_CPU && o.mem_trace) die("--mem-trace measures GPU memory: it needs the GPU path");
    if (backend == BACKEND_CPU && o.overlap_optimizer) die("--overlap-optimizer overlaps the GPU's optimizer with its backward: it needs a GPU");
    if (backend == BACKEND_GPU && o.skip_nonfinite)
        printf("note: on the GPU the update runs inside the backward pass, so a non-finite step stops the run even with --skip-nonfinite\n");

    // model: a checkpoint to resume, a model.bin, a --preset or the default random init;
    // --synthetic-data needs no tokenizer
    Tokenizer tok;
    if (!o.synthetic) tokenizer_init(&tok, o.tokenizer);
    ModelConfig c;
    ParamLayout layout;
    uint16_t *params;
    char state_file[4096] = "", model_file[4096] = "";
    if (o.resume && o.lora.rank == 0) {
        resume_paths(&o, state_file, model_file, sizeof(state_file));
        if (o.model) printf("note: --resume takes the weights from %s, not --model %s\n", model_file, o.model);
        params = model_load_bf16(&c, &layout, model_file);
    } else if (o.model) {  // with LoRA also on --resume: the checkpoint holds the adapters, --model the base
        if (o.resume) resume_paths(&o, state_file, model_file, sizeof(state_file));
        params = model_load_bf16(&c, &layout, o.model);
    } else if (o.preset) {
        if (!mst_preset(o.preset, &c)) {
            fprintf(stderr, "error: unknown --preset '%s'; known: ", o.preset);
            mst_preset_list(stderr);
            return 1;
        }
        if (backend == BACKEND_CPU)
            die("--preset %s is a full-size model for GPU benchmarks: the CPU reference path does not train it "
                "(use a GPU, or the default model / --model on the CPU)", o.preset);
        param_layout_init(&layout, &c);
        params = NULL;  // gpu_model_init draws the random init on the device
        printf("model: --preset %s, random init on the GPU (seed %llu)\n", o.preset, (unsigned long long)o.seed);
    } else {
        params = random_init_model(&c, &layout, o.synthetic ? SYNTHETIC_DEFAULT_VOCAB : tok.vocab_size, o.seed);
        printf("model: none given: a small random-init Llama (seed %llu)\n", (unsigned long long)o.seed);
    }
    char n_params[32];
    if (!o.synthetic && tok.vocab_size > c.vocab_size)
        die("tokenizer %s has vocab_size %d, more than the model's %d: they do not belong together", o.tokenizer, tok.vocab_size, c.vocab_size);
    printf("model: %s | vocab %d | d %d | %d layers | %d heads (%d kv) x %d | d_ff %d | %s parameters\n",
           family_name(c.family), c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff,
           commas((double)layout.total, n_params, sizeof(n_params)));

    if (comm) check_same_run(comm, &o, &c, params, layout.total, state_file);
    if (o.lora.rank) {
        char targets[64];
        lora_targets_string(o.lora.targets, targets, sizeof(targets));
        printf("LoRA: rank %d, alpha %g (scale %g), targets %s, frozen base %s, %s adapter values\n", o.lora.rank,
               o.lora.alpha, o.lora.alpha / o.lora.rank, targets, base_quant_name(o.lora.base_quant),
               commas((double)trainable_count(&c, &o.lora), n_params, sizeof(n_params)));
    }

    Trainer t;
    trainer_init(&t, backend, &c, params, &o, comm);
    free(params);
    if (o.profile) {
        if (backend != BACKEND_GPU) die("--profile measures GPU time: it needs the GPU path");
        gpu_model_profile_enable(&t.gpu);
    }
    if (o.resume && o.lora.rank) {  // the adapters of the checkpoint (lora_load checks the base they belong to)
        LoraConfig file;
        float *adapters = (float *)mallocCheck(t.n_train * sizeof(float));
        lora_load(model_file, &c, &file, NULL);
        if (file.rank != o.lora.rank || file.alpha != o.lora.alpha || file.targets != o.lora.targets)
            die("%s: adapters of rank %d alpha %g targets 0x%x; this run asks for rank %d alpha %g targets 0x%x",
                model_file, file.rank, file.alpha, file.targets, o.lora.rank, o.lora.alpha, o.lora.targets);
        lora_load(model_file, &c, &file, adapters);
        trainer_set_lora(&t, adapters);
        free(adapters);
    }
    FILE *mem_trace = NULL;
    if (o.mem_trace) {
        mem_trace = fopenCheck(o.mem_trace, "w");
        gpu_model_profile_enable(&t.gpu);
        step_profile_trace_memory(t.gpu.profile, mem_trace);
    }

    // data: the loaders check every token id against the model's vocabulary; synthetic batches
    // draw from it
    Batches train, val;
    batches_init(&train, &o, o.train, c.vocab_size, 1, o.seed);
    batches_init(&val, &o, o.val, c.vocab_size, 0, o.seed ^ 0xE7A1ULL);
    if (o.synthetic) printf("data: --synthetic-data: uniformly random tokens in [0, %d)\n", c.vocab_size);
    uint64_t rng = rng_seed(o.seed);
    int start = 0;
    if (o.resume) {
        DataPosition pos;
        start = state_load(&t, state_file, &rng, &pos);
        batches_set_position(&train, pos);
        printf("resumed from %s at step %d\n", state_file, start);
    }
    if (start > o.steps) die("the checkpoint is at step %d, past --steps %d", start, o.steps);

    FILE *log = NULL;
    if (o.log && rank0) log = fopenCheck(o.log, o.resume ? "a" : "w");
    float *dumped = o.dump_grads && rank0 ? (float *)mallocCheck(layout.total * sizeof(float)) : NULL;
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    printf("training: steps %d..%d | B=%d S=%d accum %d (%d tokens/step) | lr %g %s, warmup %d | %s\n", start + 1, o.steps,
           o.batch, o.seq_len, o.grad_accum, o.batch * o.seq_len * o.grad_accum, o.lr, o.schedule, o.warmup,
           backend == BACKEND_GPU ? "GPU" : "CPU");

    int last_eval = -1, last_sample = -1, last_ckpt = start, stopped = 0, n_ms = 0;
    double *step_ms = (double *)mallocCheck((size_t)(o.steps - start + 1) * sizeof(double));
    for (int step = start + 1; step <= o.steps; step++) {
        OptimizerStep opt = {lr_at(&o, step), o.beta1, o.beta2, o.eps, o.weight_decay, o.clip, step, (uint32_t)(o.seed + step)};
        double t0 = now_ms();
        StepOut r;
        if (o.dump_grads && step == start + 1) trainer_capture_grads(&t, dumped);
        trainer_step(&t, &train, &opt, &r);
        if (dumped && step == start + 1) dump_grads(o.dump_grads, &c, dumped, layout.total, step, comm ? comm->world : 1, o.seq_parallel);
        double ms = now_ms() - t0;
        if (o.profile && step == start + 1) gpu_model_profile_reset(&t.gpu);  // the first step warms up
        step_ms[n_ms++] = ms;
        if (!isfinite(r.loss) || !isfinite(r.grad_norm)) {
            if (!(o.skip_nonfinite && backend == BACKEND_CPU))
                die("step %d: non-finite %s (loss %g, grad norm %g): stopping without a checkpoint of this state "
                    "(the last good one is step %d; lower --lr or pass --skip-nonfinite)",
                    step, isfinite(r.loss) ? "grad norm" : "loss", r.loss, r.grad_norm, last_ckpt);
            printf("step %d/%d | non-finite loss %g / grad norm %g: update skipped\n", step, o.steps, r.loss, r.grad_norm);
        } else {
            log_step(&t, step, o.steps, &r, opt.lr, ms, log);
        }
        if (o.eval_every > 0 && step % o.eval_every == 0) { evaluate(&t, &val, o.eval_batches, step, log); last_eval = step; }
        if (o.sample_every > 0 && o.sample_tokens > 0 && step % o.sample_every == 0) { sample_text(&t, &tok, &o, &rng); last_sample = step; }
        double signalled = g_stop != 0;
        if (comm) comm_sum_host(comm, &signalled, 1);  // every rank stops after the same step
        int stop_here = signalled > 0 || step == o.stop_after;
        if (o.checkpoints && ((o.ckpt_every > 0 && step % o.ckpt_every == 0) || stop_here)) {
            ckpt_save(&t, o.ckpt_dir, o.keep_last, step, rng, batches_get_position(&train));
            last_ckpt = step;
        }
        if (stop_here && step < o.steps) {
            printf("%s: stopped after step %d %s\n",
                   g_stop == SIGINT ? "SIGINT received" : g_stop == SIGTERM ? "SIGTERM received" : signalled > 0 ? "another rank got a signal" : "--stop-after", step,
                   o.checkpoints ? "with a checkpoint; continue with --resume latest" : "(no checkpoint: --synthetic-data without --ckpt-every)");
            stopped = 1;
            break;
        }
    }
    // the end: a final checkpoint, then evaluation and a sample (after it, so the saved RNG state
    // is the one a resumed run continues with)
    if (!stopped) {
        if (o.checkpoints && last_ckpt != o.steps) ckpt_save(&t, o.ckpt_dir, o.keep_last, o.steps, rng, batches_get_position(&train));
        if (last_eval != o.steps) evaluate(&t, &val, o.eval_batches, o.steps, log);
        if (last_sample != o.steps && o.sample_tokens > 0) sample_text(&t, &tok, &o, &rng);
    }

    if (o.profile) gpu_model_profile_print(&t.gpu, stdout);
    if (o.bench) print_bench(&t, &o, step_ms, n_ms);
    free(step_ms);
    free(dumped);
    if (log) fcloseCheck(log, o.log);
    if (mem_trace) {
        step_profile_trace_memory(t.gpu.profile, NULL);
        fcloseCheck(mem_trace, o.mem_trace);
        printf("memory trace: %s\n", o.mem_trace);
    }
    trainer_free(&t);
    if (comm) comm_free(comm);
    batches_free(&train);
    batches_free(&val);
    if (!o.synthetic) tokenizer_free(&tok);
    return 0;
}
