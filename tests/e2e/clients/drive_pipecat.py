"""Pipecat's OpenAIRealtimeLLMService in a real Pipecat pipeline, against duplexd.

Pipeline: microphone frames → user context aggregator → OpenAIRealtimeLLMService →
sink (what an output transport would play) → assistant context aggregator. The sink
records every TTSAudioRawFrame, TTSStartedFrame and InterruptionFrame it sees, in order.
Run with the clients venv: ``.venv-clients/bin/python -m tests.e2e.clients.drive_pipecat``.
"""

from __future__ import annotations

import asyncio

from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime import events
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService

from tests.e2e.clients.common import RATE, Microphone, Report, args, scenario


class Sink(FrameProcessor):
    """Where the output transport would be: records what would be played."""

    def __init__(self, report: Report) -> None:
        super().__init__()
        self.report = report
        self.started = 0
        self.r1_ms = 0.0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSStartedFrame):
            self.started += 1
            self.report.note("tts_started", n=self.started)
        elif isinstance(frame, TTSStoppedFrame):
            self.report.note("tts_stopped")
        elif isinstance(frame, InterruptionFrame):
            self.report.note("interruption", tts_turns=self.started)
        elif isinstance(frame, TTSAudioRawFrame):
            self.report.audio(frame.audio, turn=self.started)
            if self.started == 1:
                self.r1_ms += len(frame.audio) / 2 / RATE * 1000
        await self.push_frame(frame, direction)


async def main() -> None:
    a = args()
    report = Report("pipecat")
    llm = OpenAIRealtimeLLMService(
        api_key=a.key,
        base_url=f"{a.url}/realtime",
        settings=OpenAIRealtimeLLMService.Settings(
            model="gpt-realtime",
            session_properties=events.SessionProperties(
                audio=events.AudioConfiguration(
                    input=events.AudioInput(
                        turn_detection=events.TurnDetection(type="server_vad", silence_duration_ms=400)
                    )
                )
            ),
        ),
    )
    context = LLMContext()
    aggregators = LLMContextAggregatorPair(context)
    sink = Sink(report)
    pipeline = Pipeline([aggregators.user(), llm, sink, aggregators.assistant()])
    task = PipelineTask(pipeline, params=PipelineParams(audio_in_sample_rate=RATE, audio_out_sample_rate=RATE))

    async def send(pcm: bytes) -> None:
        await task.queue_frame(InputAudioRawFrame(audio=pcm, sample_rate=RATE, num_channels=1))

    runner = PipelineRunner(handle_sigint=False)
    run = asyncio.create_task(runner.run(task))
    try:
        await asyncio.sleep(1.0)  # connect + session.update
        report.note("start")
        await scenario(report, Microphone(send), lambda: sink.r1_ms, lambda: sink.started)
    finally:
        report.dump(a.out)
        await task.cancel()
        await run


if __name__ == "__main__":
    asyncio.run(main())
