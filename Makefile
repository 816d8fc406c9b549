# mst-train build. `make` builds the trainer and every test program; `make test` runs every CPU check
# and, when a GPU is present, the GPU tests. `make ARCH=80` (or 100) targets another GPU generation.

NVCC ?= $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
CC ?= gcc
PYTHON ?= python3
ARCH ?= 90

ifeq ($(NVCC),)
$(error nvcc not found: install the CUDA toolkit (13.0) or set NVCC=/path/to/nvcc)
endif
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))

# Search a list of folders for a file; the first folder that holds it wins.
find_dir = $(firstword $(foreach d,$(2),$(if $(wildcard $(d)/$(1)),$(d))))

PIP_NVIDIA := $(shell $(PYTHON) -c "import site,sys; print(' '.join(p + '/nvidia' for p in site.getsitepackages()))" 2>/dev/null)

CUDNN_INCLUDE ?= $(call find_dir,cudnn.h,$(CUDA_HOME)/include /usr/include/x86_64-linux-gnu /usr/include $(addsuffix /cudnn/include,$(PIP_NVIDIA)))
CUDNN_LIB ?= $(call find_dir,libcudnn.so,$(CUDA_HOME)/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64 $(addsuffix /cudnn/lib,$(PIP_NVIDIA)))
CUDNN_LIB := $(if $(CUDNN_LIB),$(CUDNN_LIB),$(call find_dir,libcudnn.so.9,/usr/lib/x86_64-linux-gnu $(addsuffix /cudnn/lib,$(PIP_NVIDIA))))
NCCL_INCLUDE ?= $(call find_dir,nccl.h,$(CUDA_HOME)/include /usr/include /usr/include/x86_64-linux-gnu $(addsuffix /nccl/include,$(PIP_NVIDIA)))
NCCL_LIB ?= $(call find_dir,libnccl.so,$(CUDA_HOME)/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64 $(addsuffix /nccl/lib,$(PIP_NVIDIA)))
NCCL_LIB := $(if $(NCCL_LIB),$(NCCL_LIB),$(call find_dir,libnccl.so.2,/usr/lib/x86_64-linux-gnu $(addsuffix /nccl/lib,$(PIP_NVIDIA))))

ifeq ($(CUDNN_INCLUDE),)
$(error cuDNN 9 headers (cudnn.h) not found in $(CUDA_HOME)/include, /usr/include/x86_64-linux-gnu, /usr/include or a pip nvidia-cudnn wheel: install cuDNN or set CUDNN_INCLUDE=)
endif
ifeq ($(CUDNN_LIB),)
$(error cuDNN 9 library (libcudnn.so) not found in $(CUDA_HOME)/lib64, /usr/lib/x86_64-linux-gnu or a pip nvidia-cudnn wheel: install cuDNN or set CUDNN_LIB=)
endif
ifeq ($(NCCL_INCLUDE),)
$(error NCCL headers (nccl.h) not found in $(CUDA_HOME)/include, /usr/include or a pip nvidia-nccl wheel: install NCCL or set NCCL_INCLUDE=)
endif
ifeq ($(NCCL_LIB),)
$(error NCCL library (libnccl.so) not found in $(CUDA_HOME)/lib64, /usr/lib/x86_64-linux-gnu or a pip nvidia-nccl wheel: install NCCL or set NCCL_LIB=)
endif

# cudnn-frontend is header-only C++; `make deps` fetches the headers from PyPI into .deps/.
CUDNN_FRONTEND_INCLUDE ?= .deps/cudnn_frontend/include
CUDNN_FRONTEND_VERSION ?= 1.32.0
FRONTEND_HEADER := $(CUDNN_FRONTEND_INCLUDE)/cudnn_frontend.h

GENCODE := -gencode=arch=compute_$(ARCH),code=sm_$(ARCH)
INCLUDES := -I. -I$(CUDNN_INCLUDE) -I$(NCCL_INCLUDE)
NVCC_FLAGS := -O3 -std=c++17 $(GENCODE) --expt-relaxed-constexpr -Xcompiler -Wall -Xcompiler -fopenmp $(INCLUDES)
CUDA_LIBS := -L$(CUDNN_LIB) -L$(NCCL_LIB) -Xlinker -rpath=$(CUDNN_LIB) -Xlinker -rpath=$(NCCL_LIB) -lcublasLt -lcublas -lcudnn -lnccl \
	-lnvrtc -lgomp -lpthread
C_FLAGS := -O2 -Wall -Wextra -fopenmp -I.

HEADERS := $(wildcard *.h)
GPU_OBJS := build/mst_kernels.o build/matmul.o build/attention_cudnn.o build/attn_sliced.o build/attention_softcap.o build/lora_gpu.o build/gpu_model.o \
	build/gpu_dist.o build/comm.o
CPU_TESTS := build/test_cpu_model build/test_model_loader build/test_tokenizer build/test_dataloader build/test_planner \
	build/test_quant build/test_attention_softcap_emu build/test_adamw8bit \
	build/test_dist build/test_zero build/test_ulysses build/test_gpu_counts
GPU_TESTS := build/test_llama build/test_kernels build/test_matmul build/test_attention build/test_attention_softcap \
	build/test_lora_kernels build/test_comm

.PHONY: all test deps clean
all: train_llama $(GPU_TESTS) $(CPU_TESTS)

deps: $(FRONTEND_HEADER)

$(FRONTEND_HEADER):
	@mkdir -p .deps/wheels
	@echo "fetching cudnn-frontend $(CUDNN_FRONTEND_VERSION) headers from PyPI into .deps/"
	@$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .deps/wheels nvidia-cudnn-frontend==$(CUDNN_FRONTEND_VERSION) \
		|| { echo "error: could not download nvidia-cudnn-frontend from PyPI; install its headers and set CUDNN_FRONTEND_INCLUDE=/path/to/include"; exit 1; }
	@cd .deps && $(PYTHON) -m zipfile -e wheels/nvidia_cudnn_frontend-$(CUDNN_FRONTEND_VERSION)-*.whl cudnn_frontend_wheel
	@mkdir -p .deps/cudnn_frontend && rm -rf .deps/cudnn_frontend/include && mv .deps/cudnn_frontend_wheel/include .deps/cudnn_frontend/include && rm -rf .deps/cudnn_frontend_wheel
	@test -f $@ || { echo "error: $@ missing after unpacking the wheel"; exit 1; }

build/%.o: %.cu $(HEADERS) | build
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@

build/attention_cudnn.o: attention_cudnn.cpp attention.h cuda_utils.h utils.h $(FRONTEND_HEADER) | build
	$(NVCC) $(NVCC_FLAGS) -isystem $(CUDNN_FRONTEND_INCLUDE) -c $< -o $@

train_llama: train_llama.cu $(GPU_OBJS) $(HEADERS)
	$(NVCC) $(NVCC_FLAGS) $< $(GPU_OBJS) $(CUDA_LIBS) -o $@

build/test_llama: test_llama.cu $(GPU_OBJS) $(HEADERS) | build
	$(NVCC) $(NVCC_FLAGS) $< $(GPU_OBJS) $(CUDA_LIBS) -o $@

build/test_kernels: dev/test_kernels.cu build/mst_kernels.o $(HEADERS) | build
	$(NVCC) $(NVCC_FLAGS) $< build/mst_kernels.o $(CUDA_LIBS) -o $@

build/test_matmul: dev/test_matmul.cu build/matmul.o $(HEADERS) | build
	$(NVCC) $(NVCC_FLAGS) $< build/matmul.o $(CUDA_LIBS) -o $@

build/test_lora_kernels: dev/test_lora_kernels.cu build/lora_gpu.o build/matmul.o $(HEADERS) | build
	$(NVCC) $(NVCC_FLAGS) $< build/lora_gpu.o build/matmul.o $(CUDA_LIBS) -o $@

build/test_attention: dev/test_attention.cu dev/attention_reference.h build/attention_cudnn.o $(HEADERS) | build
	$(NVCC) $(NVCC_FLAGS) $< build/attention_cudnn.o $(CUDA_LIBS) -o $@

build/test_attention_softcap: dev/test_attention_softcap.cu dev/attention_reference.h build/attention_softcap.o \
		build/attention_cudnn.o $(HEADERS) | build
	$(NVCC) $(NVCC_FLAGS) $< build/attention_softcap.o build/attention_cudnn.o $(CUDA_LIBS) -o $@

build/test_attention_softcap_emu: dev/test_attention_softcap_emu.cu dev/attention_reference.h $(HEADERS) | build
	$(NVCC) $(NVCC_FLAGS) $< $(CUDA_LIBS) -o $@

build/test_comm: dev/test_comm.cu build/comm.o $(HEADERS) | build
	$(NVCC) $(NVCC_FLAGS) $< build/comm.o $(CUDA_LIBS) -o $@

build/test_%: tests/test_%.c $(HEADERS) tests/test_util.h | build
	$(CC) $(C_FLAGS) $< -o $@ -lm

build:
	@mkdir -p build

test: all
	@bash tests/run_tests.sh

clean:
	rm -rf build train_llama
